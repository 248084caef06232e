"""ShadowKV: rebuilt keys are the SVD reconstruction of the pre-RoPE keys, outliers are the least self-similar
chunks, full rank with every chunk is exact attention; the cache end to end."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import CompressedCache, KVSqueezeError, parse_method
from kvsqueeze.core.rope import rerope, unrope
from kvsqueeze.retrieval.shadowkv import ROPE, ShadowKVBlock
from tests.conftest import tiny_model
from tests.retrieval.helpers import context, generate, ids, one_step, ragged, reference, segments, tolerance

LENGTHS = [[44, 44], [30, 44]]
DIM = 16
INV = [1.0 / (10000 ** (2 * i / DIM)) for i in range(DIM // 2)]


def post_rope(dtype=torch.float32, seed=0):
    """Keys as a model caches them: pre-RoPE keys (low-rank plus noise) rotated to positions 0..n-1 per head."""
    keys, values, lengths = ragged(LENGTHS, dim=DIM, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    basis = torch.randn(4, DIM, generator=g)
    keys = torch.randn(keys.shape[0], 4, generator=g) @ basis + 0.05 * keys
    positions = torch.cat([torch.arange(n) for row in lengths.tolist() for n in row])
    keys = rerope(keys.double(), positions, torch.tensor(INV, dtype=torch.float64)).to(dtype)
    return keys, values.to(dtype), lengths, positions


def encode(spec, keys, values, lengths, keep=None) -> ShadowKVBlock:
    B = lengths.shape[0]
    L = int(lengths.max())
    # positions [B, L]: stored tokens of a head are its first lengths[b, h] columns, at positions 0..n-1
    ctx = context(keys, lengths, keep, positions=torch.arange(L)[None].expand(B, L))
    ctx.shared[ROPE] = (INV, 1.0)
    return parse_method(spec).codec.encode(keys, values, lengths, ctx)


def test_rebuilt_keys_are_the_svd_reconstruction():
    keys, values, lengths, positions = post_rope()
    block = encode("shadowkv:rank=3,chunk=4,outliers=0", keys, values, lengths)
    B, H, C = block.counts.shape
    rebuilt = block.rebuild(torch.arange(C).expand(B, H, C).contiguous()).flatten(2, 3)  # [B, H, C*chunk, D]
    inv = torch.tensor(INV, dtype=torch.float64)
    pre = unrope(keys.double(), positions, inv)
    for (b, h), seg in segments(pre, lengths).items():
        u, s, vh = torch.linalg.svd(seg, full_matrices=False)
        low = (u[:, :3] * s[:3]) @ vh[:3]
        expect = rerope(low, torch.arange(len(seg)), inv)
        torch.testing.assert_close(rebuilt[b, h, : len(seg)].double(), expect, atol=1e-4, rtol=1e-4)
        assert (rebuilt[b, h, : len(seg)].double() - segments(keys, lengths)[b, h].double()).abs().max() > 1e-3


def test_outliers_are_the_least_similar_chunks():
    keys, values, lengths, _ = post_rope(seed=3)
    block = encode("shadowkv:chunk=4,outliers=0.25", keys, values, lengths)
    assert int(block.outlier.sum(-1).max()) == 3  # a quarter of 11 chunks
    for (b, h), seg in segments(keys, lengths).items():
        chunks = [seg[i : i + 4] for i in range(0, len(seg), 4)]
        sims = torch.stack([torch.cosine_similarity(c, c.mean(0, keepdim=True), dim=-1).mean() for c in chunks])
        expect = set(torch.topk(-sims, 3).indices.tolist())
        assert set(block.outlier[b, h].nonzero().flatten().tolist()) == expect, (b, h)
        # outliers are held exactly
        got = block.out_keys[b, h].flatten(0, 1)[block.out_present[b, h].flatten()]
        want = torch.cat([chunks[i] for i in sorted(expect)])
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("outliers", [0.0, 0.2])
def test_full_rank_and_every_chunk_is_exact_attention(dtype, outliers):
    keys, values, lengths, _ = post_rope(dtype, seed=5)
    block = encode(f"shadowkv:rank={DIM},chunk=4,outliers={outliers}", keys, values, lengths)
    q = torch.randn(2, 2, 3, DIM, generator=torch.Generator().manual_seed(6)).to(dtype)
    out, lse = block.attend(q, 0.25)
    ref, ref_lse = reference(q, keys, values, lengths, 0.25)
    tol = 4 * tolerance(dtype)  # keys go through un-rotation, the SVD and re-rotation in float32
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol * 8, rtol=tol)


def test_low_rank_and_few_chunks_is_not_exact():
    keys, values, lengths, _ = post_rope(seed=5)
    block = encode("shadowkv:rank=1,chunk=4,outliers=0,fetch=8", keys, values, lengths)
    q = torch.randn(2, 2, 3, DIM, generator=torch.Generator().manual_seed(6))
    out, _ = block.attend(q, 0.25)
    ref, _ = reference(q, keys, values, lengths, 0.25)
    assert (out.double() - ref).abs().max() > 1e-3


def test_selected_chunks_are_the_top_k_of_the_landmarks():
    keys, values, lengths, _ = post_rope(seed=7)
    block = encode("shadowkv:chunk=4,outliers=0.2,fetch=12", keys, values, lengths)
    assert block.chunks_per_step == 3
    q = torch.randn(2, 2, 2, DIM, generator=torch.Generator().manual_seed(8))
    index, ok = block.select(q)
    for (b, h), seg in segments(keys, lengths).items():
        marks = torch.stack([seg[i : i + 4].mean(0) for i in range(0, len(seg), 4)])
        score = (q[b, h] @ marks.T).amax(0)
        score[block.outlier[b, h, : len(marks)]] = float("-inf")
        assert set(index[b, h][ok[b, h]].tolist()) == set(torch.topk(score, 3).indices.tolist())


def test_full_rank_decodes_like_the_full_cache(model):
    prompt = ids(150)
    full = generate(model, CompressedCache(model, "none"), prompt)
    cache = CompressedCache(model, "shadowkv:rank=16")
    assert torch.equal(generate(model, cache, prompt), full)


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_ratio_bounds_what_is_hot(model, tier, tmp_path):
    spec = "shadowkv:rank=2,chunk=8,residual=8" + (f",tier=disk,dir={tmp_path}" if tier == "disk" else "")
    cache, hot, per_step, full = one_step(model, spec, 0.5)
    rebuilt = per_step  # every fetched value's key is rebuilt hot (same size at this model's dims)
    assert hot + per_step + rebuilt <= 0.5 * full, (hot, per_step, full)
    assert cache.nbytes(tier="cold") == full // 2 * (400 - 8) // 400  # values only, the window stays hot


def test_mistakes_are_one_line(model):
    with pytest.raises(KVSqueezeError, match="no room") as err:
        generate(model, CompressedCache(model, "shadowkv", ratio=0.95), ids(200), n=1)
    assert "\n" not in str(err.value)
    with pytest.raises(KVSqueezeError, match="sliding windows"):
        CompressedCache(tiny_model("gemma3"), "shadowkv")
