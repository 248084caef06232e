"""QJL: the asymmetric sign-sketch estimator is unbiased, and attention uses it directly."""

from __future__ import annotations

import math

import torch

from kvsqueeze.codecs.qjl import jl_matrix, qjl_estimate
from kvsqueeze.core.attention_math import partial_attention
from kvsqueeze.core.storage import KVBlock
from kvsqueeze.spec import parse_method


def test_estimator_unbiased_over_seeds():
    gen = torch.Generator().manual_seed(0)
    D, m, seeds = 32, 64, 3000
    q, k = torch.randn(D, generator=gen), torch.randn(D, generator=gen)
    exact = float(q @ k)
    est = []
    for seed in range(seeds):
        S = jl_matrix(10_000 + seed, m, D)
        signs = torch.where(S @ k >= 0, 1.0, -1.0)
        est.append(float(qjl_estimate(q[None], signs[None], k.norm()[None], S)))
    est = torch.tensor(est)
    bound = math.sqrt(math.pi / (2 * m)) * float(q.norm() * k.norm())  # paper's std bound per estimate
    assert est.std() <= bound * 1.05
    # Tolerance: 4 standard errors of the mean of `seeds` estimates.
    assert abs(float(est.mean()) - exact) <= 4 * bound / math.sqrt(seeds)
    # A biased variant (no sqrt(pi/2) factor) fails the same tolerance: the test can fail.
    assert abs(float(est.mean()) / math.sqrt(math.pi / 2) - exact) > 4 * bound / math.sqrt(seeds)


CTX = object()  # any non-None context: a prefill compression


def test_block_stores_signs_and_norms_and_attends_with_the_estimator():
    codec = parse_method("qjl:sketch=64,value_bits=8,size=16,outliers=0").codec
    gen = torch.Generator().manual_seed(1)
    B, H, L, D = 1, 2, 20, 16
    k, v = torch.randn(B * H * L, D, generator=gen), torch.randn(B * H * L, D, generator=gen)
    block = codec.encode(k, v, torch.full((B, H), L), CTX)
    assert block.signs.shape == (B * H * L, 64 // 8) and block.norms.dtype == torch.float16
    q = torch.randn(B, H, 3, D, generator=gen)
    out, lse = block.attend(q, D**-0.5)
    S = jl_matrix(0, 64, D)
    signs = torch.where(k @ S.t() >= 0, 1.0, -1.0).view(B, H, L, 64)
    logits = qjl_estimate(q, signs, k.norm(dim=-1).half().float().view(B, H, L), S) * D**-0.5
    assert torch.allclose(lse, torch.logsumexp(logits, -1), atol=1e-4)
    # materialize() yields keys whose dot products equal the estimator: the same partial attention.
    mk, mv = block.materialize(torch.float32)
    out2, lse2 = partial_attention(q, mk.view(B, H, L, D), mv.view(B, H, L, D), D**-0.5)
    assert torch.allclose(lse, lse2, atol=1e-4) and torch.allclose(out, out2, atol=1e-4)
    # 1 sign bit per projection + fp16 norm for keys; values at 8 bits + fp16 scale/zero per 16 channels.
    # (+ the block's [B, H] int64 lengths)
    assert block.nbytes() == B * H * L * (64 // 8 + 2 + D + 2 * 2 * D // 16) + B * H * 8


def _outlier_keys(n, d, gen):
    k = torch.randn(n, d, generator=gen)
    k[:, :2] *= 15.0  # two outlier channels
    return k


def test_outlier_channels_sketched_separately_lower_the_estimator_error():
    gen = torch.Generator().manual_seed(5)
    D, L = 32, 64
    k, v = _outlier_keys(L, D, gen), torch.randn(L, D, generator=gen)
    q = torch.randn(1, 1, 4, D, generator=gen)
    exact = q[0, 0] @ k.t()
    errs = {}
    for o in (0, 2):
        sq = []
        for seed in range(40):
            codec = parse_method(f"qjl:sketch=64,outliers={o},out_sketch=32,seed={seed * 7}").codec
            block = codec.encode(k, v, torch.tensor([[L]]), CTX)
            if o:
                assert sorted(block.out_idx[0].tolist()) == [0, 1]
            est = block.materialize(torch.float32)[0] @ q[0, 0].t()  # = estimator, see test above
            sq.append(((est.t() - exact) ** 2).mean())
        errs[o] = float(torch.stack(sq).mean())
    assert errs[2] < 0.5 * errs[0]


def test_ragged_attend_matches_per_head_and_flush_uses_block_outliers():
    codec = parse_method("qjl:sketch=64,outliers=2,out_sketch=16").codec
    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([[7, 12]])
    k, v = _outlier_keys(19, 16, gen), torch.randn(19, 16, generator=gen)
    block = codec.encode(k, v, lengths, CTX)
    q = torch.randn(1, 2, 2, 16, generator=gen)
    out, lse = block.attend(q, 0.25)
    ref_out, ref_lse = KVBlock.attend(block, q, 0.25)
    assert torch.allclose(out, ref_out, atol=1e-4) and torch.allclose(lse, ref_lse, atol=1e-4)
    raw = codec.encode(k[:8], v[:8], torch.tensor([[4, 4]]))  # decode flush: raw until extend
    merged = codec.extend(block, raw)
    assert merged.lengths.tolist() == [[11, 16]] and torch.equal(merged.out_idx, block.out_idx)
    out, lse = merged.attend(q, 0.25)
    ref_out, ref_lse = KVBlock.attend(merged, q, 0.25)
    assert torch.allclose(out, ref_out, atol=1e-4) and torch.allclose(lse, ref_lse, atol=1e-4)
