"""KV clustering: alternating soft matching inside chunks; stored centroids are cluster means; bytes shrink."""

from __future__ import annotations

import torch

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import PROTECTED, select
from kvsqueeze.policies.kvcluster import chunked_soft_matching, cluster_means
from kvsqueeze.spec import parse_method
from tests.conftest import tiny_model


def test_alternating_matching_stays_inside_chunks_and_takes_the_most_similar_edges():
    e = torch.eye(4)
    # chunk 0: tokens 0..3 (A = 0, 2; B = 1, 3); chunk 1: tokens 4..7 (A = 4, 6; B = 5, 7)
    keys = torch.stack([e[0], e[0] + 0.01 * e[1], e[1], e[2], e[3], e[3] * 0.9 + 0.1 * e[0], e[2], e[2] + 0.3 * e[3]])
    rep = chunked_soft_matching(keys, n_remove=2, chunk=4)
    # edges: 0->1 (cos~1), 2->3 (0), 4->5 (0.99), 6->7 (0.96); a round takes the best half of its edges
    assert rep.tolist() == [1, 1, 2, 3, 5, 5, 6, 7]
    # the third merge comes from a second round over the survivors, re-split alternately: chunk 1 is now 5, 6, 7
    # (A = 5, 7; B = 6) and 7->6 (0.96) beats 1->2, 3->2 and 5->6 (all ~0)
    rep = chunked_soft_matching(keys, n_remove=3, chunk=4)
    assert rep.tolist() == [1, 1, 2, 3, 5, 5, 6, 6]
    # a later round merges centroids: removing everything but one token per chunk
    rep = chunked_soft_matching(keys, n_remove=6, chunk=4)
    assert len(set(rep[:4].tolist())) == 1 and len(set(rep[4:].tolist())) == 1
    assert set(rep[:4].tolist()) <= {0, 1, 2, 3}  # never across chunks


def test_a_dissimilar_token_is_not_forced_into_a_cluster_when_the_merges_outnumber_one_rounds_edges():
    """Regression: removing as many tokens as a round has A tokens used to take every edge at once, so an
    outlier (here token 0, like an attention sink) was merged whatever its similarity (KL 0.95 on SmolLM2)."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.zeros(16, 8)
    keys[:, 0] = 1.0
    keys += 0.05 * torch.randn(16, 8, generator=gen)
    keys[0] = torch.eye(8)[7] * 5  # the outlier is an A token (rank 0) of chunk 0
    rep = chunked_soft_matching(keys, n_remove=8, chunk=8)  # 8 A tokens, 8 merges
    assert rep[0] == 0 and (rep == 0).sum() == 1  # the outlier stays alone
    assert rep.unique().numel() == 8  # and the 8 merges came from the similar tokens


def test_centroids_are_the_means_of_their_clusters():
    x = torch.arange(12.0).view(6, 2)
    rep = torch.tensor([1, 1, 2, 5, 5, 5])
    out = cluster_means(x, rep)
    assert torch.equal(out[1], x[:2].mean(0)) and torch.equal(out[5], x[3:].mean(0)) and torch.equal(out[2], x[2])


def test_scorer_keeps_one_slot_per_cluster_and_stores_centroids():
    gen = torch.Generator().manual_seed(0)
    B, H, L, D = 1, 2, 40, 4
    keys, values = torch.randn(B, H, L, D, generator=gen), torch.randn(B, H, L, D, generator=gen)
    ctx = LayerContext(0, 1, keys, values, None, torch.ones(B, L, dtype=torch.bool), 0.5, keep=torch.tensor([14]))
    scorer = parse_method("kvcluster:window=4,chunk=8").scorer
    scores = scorer.score(ctx)
    rep = ctx.state["kvcluster_rep"]
    assert (scores[..., -4:] == PROTECTED).all()
    keep = select(scores, torch.full((B, H), 14), ctx.valid)
    for h in range(H):
        reps = rep[0, h, :36].unique()
        assert reps.numel() == 10 and keep[0, h, reps].all()  # 36 far tokens -> 10 centroids + 4 window tokens
    new_k, new_v = scorer.merge(ctx, keep)
    for h in range(H):
        for r in rep[0, h, :36].unique():
            members = (rep[0, h] == r).nonzero().flatten()
            assert torch.allclose(new_k[0, h, r], keys[0, h, members].mean(0), atol=1e-6)
            assert torch.allclose(new_v[0, h, r], values[0, h, members].mean(0), atol=1e-6)
    assert torch.equal(new_k[..., -4:, :], keys[..., -4:, :])  # the recent window stays exact


def test_kvcluster_through_generate_shrinks_bytes():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 60))
    cache = CompressedCache(model, "kvcluster:window=8,chunk=16", budget=20)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == 65
    assert cache.stats()["tokens_kept"] == {0: [[24, 24]], 1: [[24, 24]]}  # 12 centroids + 8 window, + 4 appended
    assert cache.nbytes() == 2 * 2 * 2 * 24 * 16 * 4 == cache.full_nbytes() * 24 // 64
    evicting = CompressedCache(model, "streaming_llm", budget=20)
    model.generate(ids, past_key_values=evicting, max_new_tokens=5, do_sample=False)
    assert evicting.nbytes() == cache.nbytes()  # same bytes as an eviction method at the same budget
    scheduled = CompressedCache(model, "kvcluster:window=4+interval:every=4,budget=12")
    model.generate(ids, past_key_values=scheduled, max_new_tokens=10, do_sample=False)
    assert scheduled.layers[0].keys.shape[2] <= 12 + 3
