"""IceCache: pages hold one cluster's tokens each, a far token gets its own cluster and page, the selected pages are
those of the best-scoring clusters, every cluster is exact attention, decoded tokens update the index; the hot
budget as the cache reports it."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import CompressedCache, KVSqueezeError, parse_method
from kvsqueeze.retrieval.icecache import IceCacheBlock
from tests.conftest import tiny_model
from tests.retrieval.helpers import context, generate, ids, ragged, reference, segments, tolerance

LENGTHS = [[37, 50], [64, 9]]
DIM = 16


def encode(spec, keys, values, lengths, keep=None) -> IceCacheBlock:
    return parse_method(spec).codec.encode(keys, values, lengths, context(keys, lengths, keep))


def pages_of(block: IceCacheBlock):
    """(b, h) -> [(cluster, keys of the page)] from the cold store directly."""
    kp = block.store.full("k")
    out = {}
    B, H, P = block.counts.shape
    for b in range(B):
        for h in range(H):
            out[b, h] = [
                (int(block.owner[b, h, p]), kp[b, h, p, : int(block.counts[b, h, p])])
                for p in range(P)
                if block.counts[b, h, p] > 0
            ]
    return out


def test_pages_hold_one_cluster_each_in_token_order():
    keys, values, lengths = ragged(LENGTHS, dim=DIM, seed=1)
    block = encode("icecache:clusters=4,page=4", keys, values, lengths)
    for (b, h), seg in segments(keys, lengths).items():
        cents = block.centroids[b, h].float()
        nearest = torch.cdist(seg.float(), cents).argmin(-1)  # every token is in the cluster of its nearest centroid
        pages = pages_of(block)[b, h]
        assert sum(len(k) for _, k in pages) == len(seg)
        for cluster, page_keys in pages:
            index = [int((seg == k).all(-1).nonzero()) for k in page_keys]
            assert all(int(nearest[i]) == cluster for i in index)
            assert index == sorted(index)  # a cluster's tokens keep their order
        for c in range(4):  # a cluster's pages are full but its last
            sizes = [len(k) for cl, k in pages if cl == c]
            assert all(s == 4 for s in sizes[:-1]) and sum(sizes) == int(block.sizes[b, h, c])


def test_a_far_token_gets_its_own_cluster_and_page():
    keys, values, lengths = ragged([[60, 60]], dim=DIM, seed=2)
    keys[23] = 50 * keys.norm(dim=-1).max() * torch.nn.functional.normalize(torch.ones(DIM), dim=0)
    block = encode("icecache:clusters=5,page=4", keys, values, lengths)
    pages = pages_of(block)[0, 0]
    alone = [(c, k) for c, k in pages if (k == keys[23]).all(-1).any()]
    assert len(alone) == 1 and len(alone[0][1]) == 1  # its page holds it only
    assert int(block.sizes[0, 0, alone[0][0]]) == 1  # and so does its cluster


def test_selected_pages_are_those_of_the_best_clusters():
    keys, values, lengths = ragged(LENGTHS, dim=DIM, seed=3)
    block = encode("icecache:clusters=6,page=4,fetch=12", keys, values, lengths)
    assert block.pages_per_step == 3
    q = torch.randn(2, 2, 2, DIM, generator=torch.Generator().manual_seed(4))
    index, ok = block.select(q)
    for (b, h), _ in segments(keys, lengths).items():
        score = (q[b, h].double() @ block.centroids[b, h].double().T).amax(0)  # per cluster
        score[block.sizes[b, h] <= 0] = float("-inf")
        real = [p for p in range(block.counts.shape[-1]) if block.counts[b, h, p] > 0]
        page_score = {p: float(score[int(block.owner[b, h, p])]) for p in real}
        chosen = [int(p) for p, good in zip(index[b, h], ok[b, h], strict=True) if good]
        assert len(chosen) == min(3, len(real))
        worst = min(page_score[p] for p in chosen)
        assert all(page_score[p] <= worst + 1e-5 for p in real if p not in chosen)  # nothing better was left


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_cluster_gives_exact_attention(dtype):
    keys, values, lengths = ragged(LENGTHS, dim=DIM, dtype=dtype, seed=5)
    block = encode("icecache:clusters=5,page=4", keys, values, lengths)
    assert block.pages_per_step == 0  # no budget: every page
    q = torch.randn(2, 2, 3, DIM, generator=torch.Generator().manual_seed(6)).to(dtype)
    out, lse = block.attend(q, 0.25)
    ref, ref_lse = reference(q, keys, values, lengths, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=tolerance(dtype), rtol=tolerance(dtype))
    torch.testing.assert_close(lse.double(), ref_lse, atol=tolerance(dtype), rtol=tolerance(dtype))
    k, _ = block.materialize(dtype)
    for (b, h), seg in segments(keys, lengths).items():  # the same tokens, grouped by cluster
        got = segments(k, lengths)[b, h]
        assert sorted(map(tuple, got.float().tolist())) == sorted(map(tuple, seg.float().tolist()))


def test_few_pages_differ_from_full_attention():
    keys, values, lengths = ragged(LENGTHS, dim=DIM, seed=5)
    block = encode("icecache:clusters=5,page=4,fetch=4", keys, values, lengths)
    q = torch.randn(2, 2, 3, DIM, generator=torch.Generator().manual_seed(6))
    out, _ = block.attend(q, 0.25)
    ref, _ = reference(q, keys, values, lengths, 0.25)
    assert (out.double() - ref).abs().max() > 1e-3


def test_decoded_tokens_join_their_nearest_cluster():
    keys, values, lengths = ragged([[40, 40]], dim=DIM, seed=7)
    block = encode("icecache:clusters=3,page=4", keys, values, lengths)
    new_k = torch.randn(1, 2, 6, DIM, generator=torch.Generator().manual_seed(8)) * 3
    new_v = torch.randn(1, 2, 6, DIM, generator=torch.Generator().manual_seed(9))
    after = block.updated(new_k, new_v)
    assert after.lengths.tolist() == [[46, 46]] and block.lengths.tolist() == [[40, 40]]  # the old block unchanged
    for h in range(2):
        cents = block.centroids[0, h].float()
        joined = torch.cdist(new_k[0, h], cents).argmin(-1)
        added = torch.bincount(joined, minlength=3)
        assert torch.equal(after.sizes[0, h] - block.sizes[0, h], added.float())
        for c in range(3):  # centroids move to the mean of old and new members
            if added[c]:
                expect = (cents[c] * block.sizes[0, h, c] + new_k[0, h][joined == c].sum(0)) / after.sizes[0, h, c]
                torch.testing.assert_close(after.centroids[0, h, c].float(), expect)
        new_pages = [(c, k) for c, k in pages_of(after)[0, h][len(pages_of(block)[0, h]) :]]
        for c, k in new_pages:
            assert all(int(joined[int((new_k[0, h] == row).all(-1).nonzero())]) == c for row in k)
    q = torch.randn(1, 2, 1, DIM, generator=torch.Generator().manual_seed(10))
    ref, _ = reference(
        q, torch.cat([keys.view(1, 2, 40, DIM), new_k], 2).flatten(0, 2),
        torch.cat([values.view(1, 2, 40, DIM), new_v], 2).flatten(0, 2), after.lengths, 0.25,
    )  # fmt: skip
    out, _ = after.attend(q, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=tolerance(torch.float32), rtol=tolerance(torch.float32))


def test_every_cluster_decodes_like_the_full_cache_through_updates(model):
    prompt = ids(150)
    full = generate(model, CompressedCache(model, "none"), prompt, n=30)
    cache = CompressedCache(model, "icecache:group=8,residual=8")
    assert torch.equal(generate(model, cache, prompt, n=30), full)
    block = cache.layers[0].blocks[0]
    assert len(cache.layers[0].blocks) == 1 and int(block.lengths.max()) == 150 - 8 + 24  # three updates


@pytest.mark.parametrize(
    ("spec", "ratio", "needle"),
    [("icecache", 0.99, "no room"), ("icecache:page=0", None, "page must be"), ("icecache+kivi", None, "compose")],
)
def test_mistakes_are_one_line(model, spec, ratio, needle):
    with pytest.raises(KVSqueezeError, match=needle) as err:
        generate(model, CompressedCache(model, spec, ratio=ratio), ids(100), n=1)
    assert "\n" not in str(err.value)
    with pytest.raises(KVSqueezeError, match="sliding windows"):
        CompressedCache(tiny_model("gemma3"), "icecache")
