"""LeoAM: chunks follow the attention's skew (deserts long, attended tokens short), the abstracts bound every key of
their chunk, the best chunks are fetched token-exactly within the budget, every token is exact attention, a RAM tier
in front of the disk holds the most attended chunks and changes nothing but where tokens are read."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import parse_method
from kvsqueeze.core.tiers import paginate
from kvsqueeze.retrieval.leoam import LeoAMBlock, chunk_ids
from tests.retrieval.helpers import context, ragged, reference, segments, tolerance

LENGTHS = [[37, 50], [64, 9]]
DIM = 16


def encode(spec, keys, values, lengths, queries=None, keep=None) -> LeoAMBlock:
    ctx = context(keys, lengths, keep)
    ctx.keys = paginate(keys, lengths, 1)[0][:, :, :, 0]  # [B, H, L, D], as the layer holds them
    ctx.queries = queries
    return parse_method(spec).codec.encode(keys, values, lengths, ctx)


def reference_chunks(mass: list[float], per_chunk: float, longest: int) -> list[int]:
    """Chunk of each token, one token at a time."""
    out, chunk, run, band_prev, before, heavy_prev = [], -1, 0, None, 0.0, False
    for m in mass:
        band = int(before // per_chunk)
        heavy = m >= per_chunk
        if band != band_prev or heavy or heavy_prev or run == longest:
            chunk, run = chunk + 1, 0
        out.append(chunk)
        run, band_prev, before, heavy_prev = run + 1, band, before + m, heavy
    return out


def test_chunks_follow_the_attention_skew():
    mass = torch.full((1, 2, 64), 0.2 / 62)
    mass[0, 0, 10], mass[0, 0, 30] = 0.5, 0.3  # head 0: two attended tokens in deserts
    mass[0, 1] = 1 / 64  # head 1: flat attention
    present = torch.ones(1, 2, 64, dtype=torch.bool)
    present[0, 1, 60:] = False
    cid = chunk_ids(mass, present, 0.093, 16)  # (not a multiple of the flat mass: no rounding ties)
    for h in range(2):
        n = int(present[0, h].sum())
        assert cid[0, h, :n].tolist() == reference_chunks(mass[0, h, :n].tolist(), 0.093, 16), h
        assert (cid[0, h, n:] == -1).all()
    skewed, flat = cid[0, 0], cid[0, 1, :60]
    assert (skewed == skewed[10]).sum() == 1 and (skewed == skewed[30]).sum() == 1  # an attended token alone
    assert int(skewed.max()) < int(flat.max())  # deserts merge: fewer, longer chunks than flat attention
    assert torch.bincount(skewed).max() == 16  # up to the longest chunk


def test_abstracts_bound_their_chunks_and_selection_fits_the_budget():
    keys, values, lengths = ragged(LENGTHS, dim=DIM, seed=1)
    q_pre = torch.randn(2, 4, 64, DIM, generator=torch.Generator().manual_seed(2))
    block = encode("leoam:mass=0.05,chunk=8,fetch=20", keys, values, lengths, queries=q_pre)
    assert block.tokens_per_step == 20
    q = torch.randn(2, 2, 3, DIM, generator=torch.Generator().manual_seed(3))
    bounds = block.bounds(q)
    index, used, chunks = block.select(q)
    for (b, h), seg in segments(keys, lengths).items():
        n_chunks = int((block.length[b, h] > 0).sum())
        spans = [(int(block.start[b, h, c]), int(block.length[b, h, c])) for c in range(n_chunks)]
        assert sum(n for _, n in spans) == len(seg)
        for c, (s, n) in enumerate(spans):
            true = (q[b, h] @ seg[s : s + n].T).max()
            assert true <= bounds[b, h, c] + 1e-4
        ranked = sorted(range(n_chunks), key=lambda c: -float(bounds[b, h, c]))
        expect, room = [], 20
        for c in ranked:  # best chunks, in order, while they fit
            if spans[c][1] > room:
                break
            expect.append(c)
            room -= spans[c][1]
        assert sorted(torch.nonzero(chunks[b, h]).flatten().tolist()) == sorted(expect), (b, h)
        fetched = sorted(index[b, h][used[b, h]].tolist())
        assert fetched == sorted(t for c in expect for t in range(spans[c][0], spans[c][0] + spans[c][1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_token_is_exact_attention(dtype):
    keys, values, lengths = ragged(LENGTHS, dim=DIM, dtype=dtype, seed=4)
    block = encode("leoam:mass=0.1,chunk=8", keys, values, lengths)
    q = torch.randn(2, 2, 3, DIM, generator=torch.Generator().manual_seed(5)).to(dtype)
    out, lse = block.attend(q, 0.25)
    ref, ref_lse = reference(q, keys, values, lengths, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=tolerance(dtype), rtol=tolerance(dtype))
    torch.testing.assert_close(lse.double(), ref_lse, atol=tolerance(dtype), rtol=tolerance(dtype))
    k, v = block.materialize(dtype)
    assert torch.equal(k, keys) and torch.equal(v, values)


def test_few_tokens_differ_from_full_attention():
    keys, values, lengths = ragged(LENGTHS, dim=DIM, seed=4)
    block = encode("leoam:mass=0.1,chunk=4,fetch=8", keys, values, lengths)
    q = torch.randn(2, 2, 3, DIM, generator=torch.Generator().manual_seed(5))
    out, _ = block.attend(q, 0.25)
    ref, _ = reference(q, keys, values, lengths, 0.25)
    assert (out.double() - ref).abs().max() > 1e-3


def test_a_ram_tier_in_front_of_the_disk_holds_the_most_attended_chunks(tmp_path):
    keys, values, lengths = ragged([[64, 64]], dim=DIM, seed=6)
    q_pre = torch.randn(1, 4, 64, DIM, generator=torch.Generator().manual_seed(7))
    q_pre[:, :2, -8:] = 4 * keys[20]  # the last queries of head 0 attend to token 20
    spec = f"leoam:mass=0.05,chunk=8,fetch=24,tier=disk,dir={tmp_path}"
    disk = encode(spec, keys, values, lengths, queries=q_pre)
    tiered = encode(spec + ",warm=0.25", keys, values, lengths, queries=q_pre)
    ram_slot = tiered.warm.arrays["slot"][0, :, :, 0, 0]
    assert ((ram_slot >= 0).sum(-1) <= 16).all() and ram_slot[0, 20] >= 0  # a quarter, the attended token in it
    assert torch.equal(tiered.warm.arrays["k"][0, 0, int(ram_slot[0, 20]), 0], keys[20])
    q = torch.randn(1, 2, 1, DIM, generator=torch.Generator().manual_seed(8))
    q[0, 0, 0] = keys[20]
    read = []
    original = type(tiered.store).take_points

    def counted(store, name, rows, heads, pages):
        read.append(len(rows))
        return original(store, name, rows, heads, pages)

    type(tiered.store).take_points = counted
    try:
        out, lse = tiered.attend(q, 0.25)
    finally:
        type(tiered.store).take_points = original
    expect, expect_lse = disk.attend(q, 0.25)
    assert torch.equal(out, expect) and torch.equal(lse, expect_lse)  # the tier changes where, not what
    index, _, _ = tiered.select(q)
    hits = int((ram_slot.gather(-1, index[0]) >= 0).sum())
    assert hits > 0 and read == [2 * 24 - hits] * 2  # keys and values: only the misses come from disk
