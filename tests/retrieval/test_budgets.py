"""What every retrieval codec owes: fetching everything decodes like the full cache (the cold tier changes where
tokens live, not what attention sees), and ``ratio`` bounds the hot bytes — summaries, window and one step's fetch —
while using most of that budget. Method-specific properties live in each method's own test module."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import CompressedCache
from tests.retrieval.helpers import generate, ids, one_step

EVERYTHING_FETCHED = ["a2ats", "actqkv:least=1000", "leoam", "quest:page=16"]
BUDGETED = [
    "a2ats:codebook=16,residual=8",
    "actqkv:window=8,residual=8",  # fetches its fixed maximum: windows past the cut-off are masked
    "icecache:page=8,residual=8",
    "leoam:mass=0.05,chunk=8,residual=8",
    "quest:page=8,residual=8",
]


@pytest.mark.parametrize("spec", EVERYTHING_FETCHED)
def test_everything_fetched_decodes_like_the_full_cache(model, spec):
    prompt = ids(150)
    full = generate(model, CompressedCache(model, "none"), prompt)
    cache = CompressedCache(model, spec)
    assert torch.equal(generate(model, cache, prompt), full)
    assert cache.nbytes(tier="cold") > 0


@pytest.mark.parametrize("spec", BUDGETED)
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_ratio_bounds_what_is_hot(model, spec, ratio):
    cache, hot, per_step, full = one_step(model, spec, ratio)
    assert per_step > 0
    assert hot + per_step <= (1 - ratio) * full, (hot, per_step, full)
    assert hot + per_step >= 0.8 * (1 - ratio) * full  # the budget is used, not wasted
    # storage-based: RAM cold stores are part of nbytes(), and not of the hot tier
    assert cache.nbytes() == cache.nbytes(tier="hot") + cache.nbytes(tier="cold")
