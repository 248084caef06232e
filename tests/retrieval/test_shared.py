"""What every retrieval codec owes: fetching everything decodes like the full cache (the cold tier changes where
tokens live, not what attention sees), and ``ratio`` bounds the hot bytes — summaries, window and one step's fetch —
while using most of that budget; a mistake is one line. Method-specific properties live in each method's own
test module."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import CompressedCache, KVSqueezeError
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


@pytest.mark.parametrize(
    ("spec", "ratio", "needle"),
    [
        ("a2ats", 0.99, "no room"),
        ("a2ats:codebook=0", None, "codebook must be"),
        ("a2ats:group=8", None, "drop group="),
        ("a2ats+kivi", None, "does not compose"),
        ("actqkv", 0.99, "no room"),
        ("actqkv:window=0", None, "must be >= 1"),
        ("actqkv:group=8", None, "drop group="),
        ("leoam", 0.99, "no room"),
        ("leoam:mass=0", None, "mass must be"),
        ("leoam:warm=0.5", None, "add tier=disk"),
        ("leoam:chunk=64,fetch=16", None, "cannot hold one"),
        ("quest:page=8", 0.99, "no room"),
        ("quest:page=0", None, "page must be"),
        ("quest:tier=tape", None, "tier=ram or tier=disk"),
        ("quest:tier=disk,dir=/nonexistent/kvsqueeze", None, "is not a directory"),
        ("quest+kivi", None, "does not compose"),
        ("h2o+quest+interval:every=4,budget=48", None, "prefill schedule"),
    ],
)
def test_mistakes_are_one_line(model, spec, ratio, needle):
    with pytest.raises(KVSqueezeError, match=needle) as err:
        generate(model, CompressedCache(model, spec, ratio=ratio), ids(100), n=1)
    assert "\n" not in str(err.value)
