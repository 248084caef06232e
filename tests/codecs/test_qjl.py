"""QJL: the asymmetric sign-sketch estimator is unbiased, and attention uses it directly."""

from __future__ import annotations

import math

import torch

from kvsqueeze.codecs.base import partial_attention
from kvsqueeze.codecs.qjl import jl_matrix, qjl_estimate
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


def test_block_stores_signs_and_norms_and_attends_with_the_estimator():
    codec = parse_method("qjl:sketch=64,value_bits=8,size=16").codec
    gen = torch.Generator().manual_seed(1)
    B, H, L, D = 1, 2, 20, 16
    k, v = torch.randn(B * H * L, D, generator=gen), torch.randn(B * H * L, D, generator=gen)
    block = codec.encode(k, v, torch.full((B, H), L))
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
    assert block.nbytes() == B * H * L * (64 // 8 + 2 + D + 2 * 2 * D // 16)


def test_ragged_attend_matches_per_head():
    codec = parse_method("qjl:sketch=64").codec
    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([[7, 12]])
    k, v = torch.randn(19, 16, generator=gen), torch.randn(19, 16, generator=gen)
    block = codec.encode(k, v, lengths)
    q = torch.randn(1, 2, 2, 16, generator=gen)
    out, lse = block.attend(q, 0.25)
    for h, (start, n) in enumerate([(0, 7), (7, 12)]):
        one = codec.encode(k[start : start + n], v[start : start + n], torch.tensor([[n]]))
        o1, l1 = one.attend(q[:, h : h + 1], 0.25)
        assert torch.allclose(out[0, h], o1[0, 0], atol=1e-5) and torch.allclose(lse[0, h], l1[0, 0], atol=1e-5)
