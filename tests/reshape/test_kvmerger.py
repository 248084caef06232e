"""KVMerger: consecutive similar keys form merging sets; evicted members fold into the pivot by Gaussian weights."""

from __future__ import annotations

import math

import torch

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.policies.kvmerger import gaussian_merge, merging_sets
from tests.conftest import tiny_model


def test_merging_sets_are_runs_of_similar_neighbours():
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.9, 0.0], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.0]])
    assert merging_sets(keys, 0.9).tolist() == [0, 0, 0, 1, 1, 2]


def test_evicted_tokens_fold_into_the_pivot_with_gaussian_weights():
    keys = torch.tensor([[1.0, 0.0], [1.2, 0.0], [2.0, 0.5], [0.0, 3.0], [0.0, 2.0]])
    values = torch.arange(10.0).view(5, 2)
    keep = torch.tensor([False, True, False, True, False])
    scores = torch.tensor([0.1, 0.9, 0.2, 0.5, 0.3])
    sets = torch.tensor([0, 0, 0, 1, 2])  # token 4 is alone in its set and evicted: dropped, not merged
    sigma = 0.7
    new_k, new_v = gaussian_merge(keys, values, keep, scores, sets, sigma)
    w = [math.exp(-((keys[1] - keys[i]).pow(2).sum()) / (2 * sigma**2)) for i in (0, 2)]
    expected_k = (keys[1] + w[0] * keys[0] + w[1] * keys[2]) / (1 + sum(w))
    expected_v = (values[1] + w[0] * values[0] + w[1] * values[2]) / (1 + sum(w))
    assert torch.allclose(new_k[1], expected_k) and torch.allclose(new_v[1], expected_v)
    assert torch.equal(new_k[3], keys[3]) and torch.equal(new_v[3], values[3])  # nothing evicted in its set
    assert w[0] > w[1]  # the nearer key weighs more


def test_kvmerger_through_generate_stores_merged_pivots():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 40))
    plain = CompressedCache(model, "h2o", ratio=0.5)
    merged = CompressedCache(model, "kvmerger:threshold=0.0,sigma=100", ratio=0.5)
    for cache in (plain, merged):
        model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert plain.stats()["tokens_kept"] == merged.stats()["tokens_kept"]  # same tokens, same bytes
    assert plain.nbytes() == merged.nbytes()
    assert not torch.allclose(plain.layers[0].keys, merged.layers[0].keys)  # but evicted keys were folded in
    cache = CompressedCache(model, "kvmerger+interval:every=4,budget=12")
    model.generate(ids, past_key_values=cache, max_new_tokens=10, do_sample=False)
    assert cache.layers[0].keys.shape[2] <= 12 + 3
