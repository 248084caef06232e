"""validate_budget: malformed or never-applied ratios and budgets are refused in one line, never coerced."""

from __future__ import annotations

import numpy as np
import pytest

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import parse_method
from kvsqueeze.validation import validate_budget


@pytest.mark.parametrize(
    ("ratio", "budget", "method", "expected"),
    [
        (0.5, None, "snapkv", (0.5, None)),
        (None, 64, "snapkv", (None, 64)),
        (None, 64.0, "h2o", (None, 64)),  # a whole float is a whole number of tokens
        (None, np.int64(32), "knorm", (None, 32)),
        (None, None, "none", (None, None)),
        (0.0, None, "none", (0.0, None)),  # ratio 0 removes nothing: true of the full cache
        (0.25, None, "snapkv+kivi:bits=2", (0.25, None)),
        (None, 128, "h2o+interval:every=8", (None, 128)),  # the schedule takes the caller's budget
        (None, None, "h2o+interval:every=8,budget=64", (None, None)),
        (None, 64, "lazyeviction", (None, 64)),  # a decoding schedule evicts without a scorer
        (0.5, None, parse_method("tova"), (0.5, None)),
    ],
)
def test_accepted_requests(ratio, budget, method, expected):
    assert validate_budget(ratio, budget, method) == expected


@pytest.mark.parametrize(
    ("ratio", "budget", "method", "message"),
    [
        (None, 40.9, "snapkv", "budget must be a whole number of tokens per KV head, got 40.9"),
        (None, True, "snapkv", "got True"),
        (None, 0, "snapkv", "budget must be >= 1"),
        (None, "64", "snapkv", "whole number"),
        (None, float("inf"), "snapkv", "whole number"),
        (True, None, "snapkv", "ratio must be a number"),
        (1.0, None, "snapkv", "ratio must be in [0, 1)"),
        (-0.1, None, "snapkv", "ratio must be in [0, 1)"),
        (float("nan"), None, "snapkv", "ratio must be in [0, 1)"),
        ("0.5", None, "snapkv", "ratio must be a number"),
        (0.5, 10, "snapkv", "either a ratio or a budget"),
        (None, None, 123, "method must be a spec string such as 'snapkv'"),
        (None, None, None, "got NoneType"),
        (0.5, None, "none", "the full cache: the ratio 0.5 would never be applied"),
        (None, 10, "none", "the budget 10 would never be applied"),
        (None, 10, "kivi", "kivi stores every token (a codec without a scorer): the budget 10 would never be applied"),
        (0.5, None, "kivi:bits=4", "e.g. 'snapkv+kivi:bits=4'"),
        (None, 32, "h2o+interval:ratio=0.5", "sets its own ratio (0.5); the budget 32 would never be applied"),
        (None, 32, "h2o+interval:budget=64", "sets its own budget (64 tokens); the budget 32 would never be applied"),
    ],
)
def test_refused_requests(ratio, budget, method, message):
    with pytest.raises(KVSqueezeError) as info:
        validate_budget(ratio, budget, method)
    assert message in str(info.value) and "\n" not in str(info.value)
