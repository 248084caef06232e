"""A²ATS: approximate scores are the WRoPE-rotated query times the codebook reconstruction (and the exact score at the
window distance when every token is its own codeword), the codebook is query-aware, the top-K finds a planted token,
every token fetched is exact attention; the hot budget as the cache reports it."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import CompressedCache, KVSqueezeError, parse_method
from kvsqueeze.core.rope import rerope
from kvsqueeze.retrieval.a2ats import ROPE, A2ATSBlock
from tests.conftest import tiny_model
from tests.retrieval.helpers import context, ids, ragged, reference, segments, tolerance

LENGTHS = [[37, 50], [64, 9]]
DIM = 16
INV = [1.0 / (10000 ** (2 * i / DIM)) for i in range(DIM // 2)]


def encode(spec, keys, values, lengths, keep=None, queries=None, at_zero=False) -> A2ATSBlock:
    """``at_zero``: every token at RoPE position 0 (no rotation: the stored keys are their pre-RoPE keys)."""
    B, L = lengths.shape[0], int(lengths.max())
    positions = torch.zeros(B, L, dtype=torch.long) if at_zero else torch.arange(L)[None].expand(B, L)
    ctx = context(keys, lengths, keep, positions=positions)
    ctx.queries = queries
    ctx.shared[ROPE] = (INV, 1.0)
    return parse_method(spec).codec.encode(keys, values, lengths, ctx)


def queries(n=8, seed=9, spread=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, n, DIM, generator=g)  # 2 query heads per KV head
    return q if spread is None else q * spread


def test_approximate_scores_are_the_rotated_query_times_the_codeword():
    keys, values, lengths = ragged(LENGTHS, dim=DIM, seed=1)
    block = encode("a2ats:codebook=8,distance=100", keys, values, lengths, queries=queries())
    q = torch.randn(2, 2, 3, DIM, generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([[[70, 71, 72]], [[90, 91, 92]]])  # [B, 1, M]
    got = block.approx_scores(q, pos)
    inv = torch.tensor(INV, dtype=torch.float64)
    for (b, h), seg in segments(keys, lengths).items():
        qw = rerope(q[b, h].double(), 100 - pos[b, 0], inv)  # R(distance - m) q, float64
        words = block.codebook[b, h].double()[block.codes[b, h, : len(seg)].long()]  # [n, D]
        torch.testing.assert_close(got[b, h, :, : len(seg)].double(), qw @ words.T, atol=1e-4, rtol=1e-4)
    assert int(block.codes.max()) < 8 and block.codes.dtype == torch.uint8


def test_with_one_codeword_per_token_the_score_is_exact_at_the_window_distance():
    """WRoPE: the approximation is ``q·k`` as if the key were ``distance`` positions before the query."""
    keys, values, lengths = ragged([[20, 20]], dim=DIM, seed=3)
    pre = keys.clone()
    positions = torch.cat([torch.arange(20), torch.arange(20)])
    inv = torch.tensor(INV, dtype=torch.float64)
    post = rerope(pre.double(), positions, inv).float()
    block = encode("a2ats:codebook=20,distance=50", post, values, lengths, queries=queries(seed=4)[:1])
    q_pre = torch.randn(1, 2, 1, DIM, generator=torch.Generator().manual_seed(5))
    m = 57
    q_post = rerope(q_pre.flatten(0, 2).double(), torch.tensor([m]), inv).float().view(1, 2, 1, DIM)
    got = block.approx_scores(q_post, torch.tensor([[[m]]]))  # [1, 2, 1, 20]
    for (b, h), seg in segments(pre, lengths).items():
        # the exact post-RoPE score of each key placed at position m - distance
        k_at = rerope(seg.double(), torch.full((20,), m - 50), inv)
        exact = rerope(q_pre[b, h].double(), torch.tensor([m]), inv) @ k_at.T
        torch.testing.assert_close(got[b, h].double(), exact, atol=1e-3, rtol=1e-4)


def test_the_codebook_is_query_aware():
    """Queries that read a few channels: the codebook fitted with their statistics approximates their scores better
    than plain k-means of the keys (the paper's objective, ``E_q[(q·k - q·c)^2]``)."""
    keys, values, lengths = ragged([[64, 64]], dim=DIM, seed=6)  # keys with large channels 0, 5, 10, 15
    spread = torch.full((DIM,), 0.05)
    spread[[1, 2, 3]] = 4.0  # channels the queries read
    q = queries(16, seed=7, spread=spread)[:1]
    aware = encode("a2ats:codebook=6,distance=0", keys, values, lengths, queries=q, at_zero=True)
    plain = encode("a2ats:codebook=6,distance=0", keys, values, lengths, queries=None, at_zero=True)
    qk = q.view(1, 2, 32, DIM)
    pos = torch.zeros(1, 1, 32, dtype=torch.long)
    exact = torch.stack([qk[0, h] @ seg.T for (_, h), seg in segments(keys, lengths).items()])
    err_aware = (aware.approx_scores(qk, pos)[0] - exact).pow(2).mean()
    err_plain = (plain.approx_scores(qk, pos)[0] - exact).pow(2).mean()
    assert err_aware < 0.5 * err_plain, (err_aware, err_plain)


def test_top_k_contains_a_planted_high_score_token():
    keys, values, lengths = ragged([[80, 80], [80, 80]], dim=DIM, seed=8)
    q = torch.randn(2, 2, 1, DIM, generator=torch.Generator().manual_seed(9))
    planted = {(0, 0): 33, (0, 1): 70, (1, 0): 12, (1, 1): 55}
    segs = segments(keys, lengths)
    for (b, h), n in planted.items():
        segs[b, h][n] = 6 * q[b, h, 0] / q[b, h, 0].norm() * keys.abs().max()
    keys = torch.cat([segs[k] for k in sorted(segs)])
    spec = "a2ats:codebook=16,distance=0,fetch=4,sinks=2"
    block = encode(spec, keys, values, lengths, queries=queries(seed=1), at_zero=True)
    pos = torch.zeros(2, 1, 1, dtype=torch.long)
    index, ok = block.select(q, pos)
    assert index.shape[-1] == 4 and ok.all()
    for (b, h), n in planted.items():
        assert n in index[b, h].tolist(), (b, h)
        assert not (index[b, h] < 2).any()  # sinks are attended exactly, never selected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_tokens_give_exact_attention(dtype):
    keys, values, lengths = ragged(LENGTHS, dim=DIM, dtype=dtype, seed=5)
    block = encode("a2ats:codebook=8", keys, values, lengths, queries=queries().to(dtype))
    assert block.tokens_per_step == 64  # no budget: every token
    q = torch.randn(2, 2, 3, DIM, generator=torch.Generator().manual_seed(6)).to(dtype)
    out, lse = block.attend(q, 0.25)
    ref, ref_lse = reference(q, keys, values, lengths, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=tolerance(dtype), rtol=tolerance(dtype))
    torch.testing.assert_close(lse.double(), ref_lse, atol=tolerance(dtype), rtol=tolerance(dtype))
    k, v = block.materialize(dtype)
    assert torch.equal(k, keys) and torch.equal(v, values)


def test_few_tokens_differ_from_full_attention():
    keys, values, lengths = ragged(LENGTHS, dim=DIM, seed=5)
    block = encode("a2ats:codebook=8,fetch=4", keys, values, lengths, queries=queries())
    q = torch.randn(2, 2, 3, DIM, generator=torch.Generator().manual_seed(6))
    out, _ = block.attend(q, 0.25)
    ref, _ = reference(q, keys, values, lengths, 0.25)
    assert (out.double() - ref).abs().max() > 1e-3


def test_left_padding_uses_each_rows_positions(model):
    """Rows with different padding: each row's queries are rotated by its own RoPE positions (position - column)."""
    a, b = ids(120, 1), ids(100, 2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 20, dtype=torch.long), b], -1)])
    mask = torch.cat([torch.ones(1, 120), torch.cat([torch.zeros(1, 20), torch.ones(1, 100)], -1)]).long()
    cache = CompressedCache(model, "a2ats:fetch=16")
    with torch.no_grad():
        model.generate(batch, attention_mask=mask, past_key_values=cache, max_new_tokens=2, do_sample=False)
    assert cache.layers[0].blocks[0].offset.tolist() == [0, -20]

    with pytest.raises(KVSqueezeError, match="sliding windows"):
        CompressedCache(tiny_model("gemma3"), "a2ats")
