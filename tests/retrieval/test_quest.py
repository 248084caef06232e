"""Quest: the page bound is an upper bound, selection is its top-k, all pages give exact attention; the hot budget
and the cold tier as the cache reports them."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import CompressedCache, KVSqueezeError, parse_method
from kvsqueeze.core.storage import storage_bytes
from kvsqueeze.retrieval.quest import QuestBlock
from tests.retrieval.helpers import context, generate, ids, ragged, reference, tolerance

LENGTHS = [[37, 50], [64, 9]]  # ragged heads and rows, partial last pages


def encode(spec: str, keys, values, lengths, keep=None) -> QuestBlock:
    codec = parse_method(spec).codec
    return codec.encode(keys, values, lengths, context(keys, lengths, keep))


def pages_of(keys, lengths, page):
    """Reference pages per (row, head): list of [n, D] tensors, from the flat layout directly."""
    out, start = {}, 0
    for b, row in enumerate(lengths.tolist()):
        for h, n in enumerate(row):
            seg = keys[start : start + n]
            out[b, h] = [seg[i : i + page] for i in range(0, n, page)]
            start += n
    return out


def test_bound_is_an_upper_bound_of_every_key_in_its_page():
    keys, values, lengths = ragged(LENGTHS, seed=1)
    block = encode("quest:page=8", keys, values, lengths)
    q = torch.randn(2, 2, 3, 16, generator=torch.Generator().manual_seed(2)) * 3
    bounds = block.bounds(q)  # [B, H, M, P]
    checked = 0
    for (b, h), pages in pages_of(keys, lengths, 8).items():
        for p, seg in enumerate(pages):
            true = q[b, h] @ seg.T  # [M, n]
            assert (true.max(-1).values <= bounds[b, h, :, p] + 1e-5 * bounds.abs().max()).all()
            # and it is attained by the page's per-channel extremes (it is the tightest such bound)
            corner = torch.where(q[b, h] > 0, seg.max(0).values, seg.min(0).values)
            torch.testing.assert_close((q[b, h] * corner).sum(-1), bounds[b, h, :, p], rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == sum((n + 7) // 8 for row in LENGTHS for n in row)


def test_selected_pages_are_the_top_k_of_the_bound():
    keys, values, lengths = ragged(LENGTHS, seed=3)
    block = encode("quest:page=8,fetch=24", keys, values, lengths)
    assert block.pages_per_step == 3
    q = torch.randn(2, 2, 2, 16, generator=torch.Generator().manual_seed(4))
    index, ok = block.select(q)
    for (b, h), pages in pages_of(keys, lengths, 8).items():
        bound = torch.stack(
            [torch.where(q[b, h] > 0, s.max(0).values, s.min(0).values).mul(q[b, h]).sum(-1) for s in pages]
        ).amax(-1)  # per page, the largest over the head's queries
        expect = set(torch.topk(bound, min(3, len(pages))).indices.tolist())
        assert set(index[b, h][ok[b, h]].tolist()) == expect, (b, h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_all_pages_give_exact_attention(dtype, tier, tmp_path):
    keys, values, lengths = ragged(LENGTHS, dtype=dtype, seed=5)
    spec = f"quest:page=8,tier={tier}" + (f",dir={tmp_path}" if tier == "disk" else "")
    block = encode(spec, keys, values, lengths)
    assert block.pages_per_step == 8  # the budget covers every page
    q = torch.randn(2, 2, 3, 16, generator=torch.Generator().manual_seed(6)).to(dtype)
    out, lse = block.attend(q, 0.25)
    ref, ref_lse = reference(q, keys, values, lengths, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=tolerance(dtype), rtol=tolerance(dtype))
    torch.testing.assert_close(lse.double(), ref_lse, atol=tolerance(dtype), rtol=tolerance(dtype))
    k, v = block.materialize(dtype)
    assert torch.equal(k, keys) and torch.equal(v, values)


def test_fewer_pages_differ_from_full_attention():
    """The test above can fail: with one page per step the output is not full attention."""
    keys, values, lengths = ragged(LENGTHS, seed=5)
    block = encode("quest:page=8,fetch=8", keys, values, lengths)
    q = torch.randn(2, 2, 3, 16, generator=torch.Generator().manual_seed(6))
    out, _ = block.attend(q, 0.25)
    ref, _ = reference(q, keys, values, lengths, 0.25)
    assert (out.double() - ref).abs().max() > 1e-3


def test_disk_tier_decodes_like_ram_and_holds_no_cold_storage(model, tmp_path):
    prompt = ids(200)
    ram = CompressedCache(model, "quest:page=8", ratio=0.5)
    disk = CompressedCache(model, f"quest:page=8,tier=disk,dir={tmp_path}", ratio=0.5)
    assert torch.equal(generate(model, ram, prompt), generate(model, disk, prompt))
    assert disk.nbytes() == disk.nbytes(tier="hot") == ram.nbytes(tier="hot")
    assert disk.nbytes(tier="cold") == ram.nbytes(tier="cold") > 0
    files = list(tmp_path.iterdir())
    assert sum(f.stat().st_size for f in files) == disk.nbytes(tier="cold")
    del disk
    assert list(tmp_path.iterdir()) == []  # the cold files go with the cache


def test_a_fork_leaves_the_context_as_it_was(model):
    cache = CompressedCache(model, "quest:page=8", ratio=0.5)
    cache.prefill(model, ids(200))
    before = cache.nbytes(tier="hot"), cache.nbytes(tier="cold")
    fork = cache.fork()
    generate(model, fork, torch.cat([ids(200), ids(3, 5)], -1))
    assert fork.nbytes(own_only=True, tier="cold") == 0  # the cold copy is shared, not copied
    assert (cache.nbytes(tier="hot"), cache.nbytes(tier="cold")) == before
    assert cache.fetch_meter.fetched_bytes == 0 < fork.fetch_meter.fetched_bytes


def test_eviction_then_retrieval(model):
    """snapkv evicts first (the ratio is its), quest moves what is kept to the cold tier and fetches ``fetch``."""
    cache = CompressedCache(model, "snapkv:window=8+quest:page=8,fetch=32", ratio=0.5)
    generate(model, cache, ids(200))
    blocks = [layer.blocks[0] for layer in cache.layers]
    assert all(isinstance(b, QuestBlock) and b.pages_per_step == 4 for b in blocks)
    assert all(int(b.lengths.max()) <= 100 for b in blocks)
    assert storage_bytes(blocks) > 0


def test_unwritable_directory_is_refused(model, tmp_path, monkeypatch):
    import kvsqueeze.core.tiers as tiers

    monkeypatch.setattr(tiers.os, "access", lambda path, mode: False)  # as a user without write permission
    with pytest.raises(KVSqueezeError, match="not writable"):
        generate(model, CompressedCache(model, f"quest:tier=disk,dir={tmp_path}"), ids(50), n=1)


def test_8_bit_summaries_still_bound_every_key_at_a_quarter_of_the_bytes():
    keys, values, lengths = ragged(LENGTHS, seed=1)
    block = encode("quest:page=8,summary_bits=8", keys, values, lengths)
    exact = encode("quest:page=8", keys, values, lengths)
    assert block.kmin.dtype == block.kmax.dtype == torch.uint8
    assert block.kmin.untyped_storage().nbytes() * 4 == exact.kmin.untyped_storage().nbytes()
    q = torch.randn(2, 2, 3, 16, generator=torch.Generator().manual_seed(2)) * 3
    bounds, tight = block.bounds(q), exact.bounds(q)
    for (b, h), pages in pages_of(keys, lengths, 8).items():
        for p, seg in enumerate(pages):
            assert (q[b, h] @ seg.T).max(-1).values.le(bounds[b, h, :, p] + 1e-5 * bounds.abs().max()).all()
    real = (exact.counts > 0)[:, :, None].expand_as(tight)
    assert (bounds[real] >= tight[real] - 1e-5 * tight.abs().max()).all()  # looser, never tighter
    assert (bounds[real] - tight[real]).abs().max() < 0.05 * tight.abs().max()  # but close


@pytest.mark.parametrize("fetch", [16, 40])  # 2 tokens x 2 pages <= 8 pages; 2 x 5 > 8: all pages, masked
def test_each_token_of_a_forward_attends_its_own_pages_as_if_decoded_alone(fetch):
    keys, values, lengths = ragged(LENGTHS, seed=7)
    block = encode(f"quest:page=8,fetch={fetch}", keys, values, lengths)
    G, T = 3, 2
    q = torch.randn(2, 2, G, T, 16, generator=torch.Generator().manual_seed(8)) * 2
    out, lse = block.attend_at(q.flatten(2, 3), 0.25, 0, T)  # grouped rows: query head major
    for t in range(T):
        alone, alone_lse = block.attend(q[:, :, :, t], 0.25)
        got = out.view(2, 2, G, T, -1)[:, :, :, t]
        torch.testing.assert_close(got, alone, atol=tolerance(torch.float32), rtol=tolerance(torch.float32))
        torch.testing.assert_close(lse.view(2, 2, G, T)[:, :, :, t], alone_lse, atol=1e-5, rtol=1e-5)
    step = encode(f"quest:page=8,fetch={fetch},select=step", keys, values, lengths)
    shared, _ = step.attend_at(q.flatten(2, 3), 0.25, 0, T)  # one selection for the forward: not the same
    assert (shared - out).abs().max() > 1e-3


def test_bad_select_and_summary_bits_are_refused():
    keys, values, lengths = ragged(LENGTHS, seed=1)
    for spec, match in [("quest:select=page", "select=token"), ("quest:summary_bits=4", "summary_bits")]:
        with pytest.raises(KVSqueezeError, match=match):
            encode(spec, keys, values, lengths)
