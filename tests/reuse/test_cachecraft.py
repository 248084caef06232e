"""Cache-Craft: selective recomputation equals a full prefill where everything after the first chunk is recomputed
and KVLink's re-positioning where nothing is; the recomputed tokens are those of highest inter-chunk attention, in
proportion to each chunk's deviation; the chunk store keeps the variant whose context overlaps most and evicts by
value under its byte limit."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvsqueeze import CompressedCache, KVSqueezeError
from kvsqueeze.reuse import cachecraft
from kvsqueeze.reuse.kvlink import encode_document, link
from kvsqueeze.reuse.recompute import recompute_tokens
from tests.conftest import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
EPS32 = torch.finfo(torch.float32).eps


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def full_prefill(model, token_ids) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=token_ids, past_key_values=cache, use_cache=True)
    return cache


def close(a, b) -> bool:
    tol = 32 * EPS32 * float(b.abs().max())  # the same function through other kernels (masked, gathered)
    return torch.allclose(a, b, atol=tol, rtol=0)


def test_recomputing_every_later_token_is_a_full_prefill_and_none_is_kvlink():
    model = tiny_model("llama")
    docs = [ids(10, 1), ids(20, 2), ids(15, 3)]
    whole = torch.cat(docs, -1)
    linked = link(model, [encode_document(model, d) for d in docs])
    recompute_tokens(model, linked, whole, torch.arange(10, 45))
    for mine, ref in zip(linked.layers, full_prefill(model, whole).layers, strict=True):
        assert close(mine.keys, ref.keys) and close(mine.values, ref.values)
    untouched = link(model, [encode_document(model, d) for d in docs])
    before = [layer.keys.clone() for layer in untouched.layers]
    recompute_tokens(model, untouched, whole, torch.zeros(0, dtype=torch.long))
    assert all(torch.equal(b, layer.keys) for b, layer in zip(before, untouched.layers, strict=True))


def test_inter_chunk_attention_is_the_attention_to_earlier_chunks():
    model = tiny_model("llama")
    head, chunks = ids(4, 0), [ids(8, 1), ids(6, 2)]
    cache, variants = cachecraft.prefill_chunks(model, head, chunks)
    assert torch.equal(variants[0].attention, torch.zeros(8))  # the first chunk has no chunk before it
    # reference: eager attention probabilities of the second chunk's queries on the first chunk's columns
    eager = tiny_model("llama")
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        out = eager(input_ids=torch.cat([head, *chunks], -1), output_attentions=True)
    ref = torch.stack([a[0, :, 12:18, 4:12].sum(-1).mean(0) for a in out.attentions]).mean(0)
    assert torch.allclose(variants[1].attention, ref, atol=64 * EPS32)
    assert variants[1].before == frozenset({cachecraft.chunk_id(chunks[0])}) and variants[1].start == 12
    assert torch.equal(variants[1].keys[0], cache.layers[0].keys[:, :, 12:18])


def test_recomputation_follows_deviation_and_inter_attention():
    model = tiny_model("llama")
    head, a, b, c = ids(4, 0), ids(10, 1), ids(10, 2), ids(10, 3)
    store = cachecraft.ChunkStore()
    _, variants = cachecraft.prefill_chunks(model, head, [c, a, b])  # stored in another order
    for chunk, v in zip([c, a, b], variants, strict=True):
        store.add(cachecraft.chunk_id(chunk), v)
    head_cache = CompressedCache(model, "none")
    head_cache.prefill(model, head)
    chosen = []
    original = cachecraft.recompute_tokens

    def spy(model, cache, token_ids, positions):
        chosen.append(positions)
        return original(model, cache, token_ids, positions)

    cachecraft.recompute_tokens = spy
    try:
        out, n = cachecraft.assemble(model, head_cache, [a, b, c], store, fraction=0.3, max_deviation=1.0)
        cachecraft.assemble(model, head_cache, [a, b, c], store, fraction=0.3, max_deviation=0.0)
    finally:
        cachecraft.recompute_tokens = original
    assert n == chosen[0].numel() and out.get_seq_length() == 34
    # reference allocation: deviation = CCI x (1 - Jaccard of the preceding chunks), budget 0.3 x 30 tokens
    ida, idb, idc = (cachecraft.chunk_id(x) for x in (a, b, c))
    prev_then = {ida: {idc}, idb: {idc, ida}, idc: set()}
    prev_now = {ida: set(), idb: {ida}, idc: {ida, idb}}
    want = []
    devs = {}
    # c was computed first (nothing to attend to, CCI 0 measured): it takes the mean CCI of the variants computed
    # after other chunks, and its first tokens are recomputed
    prior = (variants[1].impact + variants[2].impact) / 2
    assert variants[0].impact == 0 and prior > 0
    for x, v in zip((idc, ida, idb), variants, strict=True):
        j = len(prev_then[x] & prev_now[x]) / len(prev_then[x] | prev_now[x]) if prev_then[x] | prev_now[x] else 1.0
        devs[x] = (v.impact if prev_then[x] else prior) * (1 - j)
    total = sum(devs.values())
    exact = {x: 9 * devs[x] / total for x in devs}  # no chunk's share reaches its 10 tokens: no cap binds
    count = {x: int(exact[x]) for x in devs}
    for x in sorted(devs, key=lambda x: exact[x] - count[x], reverse=True)[: 9 - sum(count.values())]:
        count[x] += 1  # largest remainders: the shares add up to the budget
    for start, x, v in ((4, ida, variants[1]), (14, idb, variants[2]), (24, idc, variants[0])):
        share = count[x]
        if share and x == idc:
            want.append(start + torch.arange(share))
        elif share:
            want.append(start + torch.topk(v.attention, share).indices.sort().values)
    assert count[idc] > 0 and chosen[0].numel() == 9
    assert torch.equal(chosen[0], torch.cat(want).sort().values)
    # a chunk deviating more than max_deviation is not reusable: recomputed whole (here every deviating chunk)
    whole = [torch.arange(s, s + 10) for s, x in ((4, ida), (14, idb), (24, idc)) if devs[x] > 0]
    assert torch.equal(chosen[1], torch.cat(whole))
    # the same variants in their own context: no deviation, nothing recomputed, keys only moved
    _, n_same = cachecraft.assemble(model, head_cache, [c, a, b], store, fraction=0.3)
    assert n_same == 0


def test_shares_cap_each_chunk_at_its_size_and_pass_the_rest_on():
    assert cachecraft.shares(9, [0.5, 0.25, 0.25], [10, 10, 10]) == [5, 2, 2]  # 4.5 / 2.25 / 2.25: largest remainder
    assert cachecraft.shares(10, [3.0, 1.0], [4, 100]) == [4, 6]  # 7.5 capped at 4: its 3.5 go to the other
    assert cachecraft.shares(50, [0.2, 0.0, 0.1], [10, 10, 10]) == [10, 0, 10]  # no deviation: never recomputed
    assert cachecraft.shares(0, [0.2], [10]) == [0] and cachecraft.shares(5, [], []) == []


def test_fraction_one_recomputes_every_deviating_token_as_a_full_prefill():
    model = tiny_model("llama")
    head, a, b, c = ids(4, 0), ids(10, 1), ids(10, 2), ids(7, 3)
    store = cachecraft.ChunkStore()
    _, variants = cachecraft.prefill_chunks(model, head, [c, a, b])
    for chunk, v in zip([c, a, b], variants, strict=True):
        store.add(cachecraft.chunk_id(chunk), v)
    head_cache = CompressedCache(model, "none")
    head_cache.prefill(model, head)
    out, n = cachecraft.assemble(model, head_cache, [a, b, c], store, fraction=1.0, max_deviation=1.0)
    assert n == 27  # every chunk deviates (all moved): all recomputed, whatever the proportions
    full = CompressedCache(model, "none")
    full.prefill(model, torch.cat([head, a, b, c], -1))
    for mine, ref in zip(out.layers, full.layers, strict=True):  # recomputed in context under a mask: float32 rounding
        assert torch.allclose(mine.keys, ref.keys, atol=1024 * EPS32, rtol=1024 * EPS32)
        assert torch.allclose(mine.values, ref.values, atol=1024 * EPS32, rtol=1024 * EPS32)


def test_store_keeps_the_closest_variant_and_evicts_the_least_valuable():
    v = lambda before, n, impact: cachecraft.Variant([torch.zeros(1, 1, n, 4)], [torch.zeros(1, 1, n, 4)], 0,  # noqa: E731
                                                     torch.full((n,), impact), frozenset(before))  # fmt: skip
    store = cachecraft.ChunkStore(max_bytes=3 * 2 * 10 * 16)
    store.add("x", v({"a"}, 10, 0.1))
    store.add("x", v({"b", "c"}, 10, 0.1))
    assert store.best("x", frozenset({"b"})).before == frozenset({"b", "c"})
    store.add("y", v(set(), 10, 0.9))  # never used and high impact: the least valuable
    store.best("x", frozenset({"a"}))
    store.add("z", v(set(), 10, 0.1))
    assert "y" not in store.variants and len(store.variants["x"]) == 2 and store.nbytes() <= store.max_bytes
    with pytest.raises(KVSqueezeError, match="fraction must be in"):
        cachecraft.assemble(tiny_model("llama"), CompressedCache(tiny_model("llama"), "none"), [ids(3, 1)], store,
                            fraction=1.5)  # fmt: skip
