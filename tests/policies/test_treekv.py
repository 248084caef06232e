"""TreeKV: the cyclic two-token eviction scope, on hand-made scores, and the smooth dense-recent / sparse-distant
shape it produces; prefill and decoding (interval) through ``model.generate``."""

from __future__ import annotations

import torch

from kvsqueeze import CompressedCache
from kvsqueeze.policies.base import select
from kvsqueeze.policies.treekv import TreeKV, tree_replay


def reference_replay(importance: list[float], capacity: int, pointer: int = 0) -> list[int]:
    """The rule written literally with a Python list, one arriving token at a time: the kept token ids."""
    cache = list(range(capacity))
    for token in range(capacity, len(importance)):
        if pointer + 1 >= capacity:
            pointer = 0
        left, right = cache[pointer], cache[pointer + 1]
        cache.remove(right if importance[right] < importance[left] else left)
        cache.append(token)
        pointer += 1
    return sorted(cache)


def kept(rank: torch.Tensor) -> list[int]:
    return (rank == rank.shape[-1] + 1).nonzero().flatten().tolist()


def test_scope_rule_by_hand():
    imp = torch.tensor([[5.0, 1.0, 2.0, 7.0, 3.0, 3.0, 0.0, 0.0]])
    # cache [0,1,2,3]; token 4: scope (0,1) drops 1; token 5: scope (2,3) drops 2 -> keep {0,3,4,5}
    rank, pointer = tree_replay(imp[:, :6], 4)
    assert kept(rank[0]) == [0, 3, 4, 5] and pointer == 2
    # token 6: scope (4,5) tie drops the older 4; token 7: the scope wraps to (0,3) and drops 0
    rank, pointer = tree_replay(imp, 4)
    assert kept(rank[0]) == [3, 5, 6, 7] and pointer == 1
    assert rank[0, 1] == 0 and rank[0, 2] == 1 and rank[0, 4] == 2 and rank[0, 0] == 3  # eviction order


def test_replay_matches_literal_rule_per_head():
    g = torch.Generator().manual_seed(3)
    imp = torch.rand(3, 200, generator=g)
    rank, _ = tree_replay(imp, 24)
    for h in range(3):
        assert kept(rank[h]) == reference_replay(imp[h].tolist(), 24)
    rank, _ = tree_replay(imp[:, :50], 24, pointer=17)  # a replay that resumes mid-pass (decoding)
    for h in range(3):
        assert kept(rank[h]) == reference_replay(imp[h, :50].tolist(), 24, pointer=17)


def test_smooth_dense_recent_sparse_distant():
    g = torch.Generator().manual_seed(0)
    N, c = 1024, 128  # ratio 0.875
    rank, _ = tree_replay(torch.rand(1, N, generator=g), c)
    positions = torch.tensor(kept(rank[0]))
    per_quarter = torch.histc(positions.float(), bins=4, min=0, max=N)
    assert per_quarter.sum() == c
    assert bool((per_quarter[1:] >= per_quarter[:-1]).all()) and per_quarter[3] > 2 * per_quarter[0]
    assert per_quarter[0] > 0  # the distant context keeps a sparse trace (not a recency window)
    gaps = positions.diff().float()
    assert gaps[: c // 4].mean() > 2 * gaps[-c // 4 :].mean()  # gaps shrink from distant to recent


def test_scorer_keeps_the_replay_survivors(make_ctx):
    L, w = 40, 4
    ctx = make_ctx(H=2, L=L)
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(1, 2, w, L, generator=g)
    ctx.window_attention = lambda window: probs
    ctx.keep = torch.tensor([10])
    scores = TreeKV(window=w).score(ctx)
    keep = select(scores, torch.tensor([[10, 10]]), ctx.valid)[0]
    seen_by = (torch.arange(L)[None, :] <= torch.arange(L - w, L)[:, None]).sum(0)
    importance = probs.sum(2)[0] / seen_by
    for h in range(2):
        assert keep[h].nonzero().flatten().tolist() == reference_replay(importance[h].tolist(), 10)
    assert ctx.state["treekv_pointer"] == [(L - 10) % 9]


def test_treekv_generate_prefill_and_interval(tiny_model):
    torch.manual_seed(5)
    ids = torch.randint(0, 128, (2, 48))
    cache = CompressedCache(tiny_model, "treekv:window=4", ratio=0.5)
    out = tiny_model.generate(ids, past_key_values=cache, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 51)
    assert all((layer.kept_lengths() == 24 + 2).all() for layer in cache.layers)  # 24 kept + 2 decoded in the tail
    cache = CompressedCache(tiny_model, "treekv:window=4+interval:every=4,budget=16")
    out = tiny_model.generate(ids, past_key_values=cache, max_new_tokens=10, do_sample=False)
    assert out.shape == (2, 58)
    for layer in cache.layers:
        assert int(layer.kept_lengths().max()) < 16 + 4
        assert layer.state["treekv_pointer"] != [0, 0]  # the scope moved on across recompressions
