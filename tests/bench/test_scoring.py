"""Scoring functions on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from kvsqueeze.bench import scoring


def test_string_match_all_and_part():
    assert scoring.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert scoring.string_match_all("APPLE pie", ["apple"]) == 1.0  # case-insensitive
    assert scoring.string_match_all("nothing", ["x"]) == 0.0
    assert scoring.string_match_part("it is 456", ["123", "456"]) == 1.0
    assert scoring.string_match_part("it is 4 5 6", ["456"]) == 0.0
    assert scoring.match("a b", ["a", "c"], "all") == 0.5 and scoring.match("a b", ["a", "c"], "part") == 1.0
    assert scoring.all_found("x 1 y 2", ["1", "2"]) and not scoring.all_found("x 1", ["1", "2"])


def test_loglik_perplexity_and_fidelity_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    targets = torch.tensor([0, 1])
    ll = scoring.gold_loglik(logits, targets)
    assert ll["loglik"] == pytest.approx(math.log(0.5) + math.log(0.8), abs=1e-6)
    assert ll["loglik_per_token"] == pytest.approx(ll["loglik"] / 2) and ll["gold_tokens"] == 2
    uniform = torch.zeros(4, 10)
    assert scoring.perplexity(uniform, torch.tensor([1, 2, 3, 4]))["ppl"] == pytest.approx(10.0)
    same = scoring.fidelity(logits, logits)
    assert same["kl"] == pytest.approx(0.0, abs=1e-7) and same["top1"] == 1.0
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    got = scoring.fidelity(p.log(), q.log())
    assert got["kl"] == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), abs=1e-6)
    assert got["top1"] == 1.0  # argmax of [0.5, 0.5] is index 0, as is [0.9, 0.1]
    assert scoring.fidelity(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]))["top1"] == 0.0


def _wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's score interval written out by hand (independent of scipy)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_interval_is_wilson_for_binary_scores():
    iv = scoring.interval([1.0, 0.0, 1.0])
    assert iv.kind == "wilson" and iv.n == 3 and iv.mean == pytest.approx(2 / 3)
    assert (iv.low, iv.high) == pytest.approx(_wilson(2, 3), abs=1e-6)
    two = scoring.interval([0.0, 1.0])  # a Student t gave 0.5 ± 6.353 here, far outside [0, 1]
    assert two.kind == "wilson" and 0.0 <= two.low < 0.5 < two.high <= 1.0
    assert (two.low, two.high) == pytest.approx(_wilson(1, 2), abs=1e-6)
    ones = scoring.interval([1.0] * 50)  # all found: still an interval below 1, not "± 0"
    assert ones.high == pytest.approx(1.0) and ones.low == pytest.approx(_wilson(50, 50)[0], abs=1e-6)
    assert ones.low < 0.95
    assert scoring.interval([0.0, 0.0, 0.0], binary=False).kind == "t"  # e.g. the full cache's KL: continuous


def test_interval_is_student_t_for_continuous_scores():
    iv = scoring.interval([1.0, 2.0, 3.0])
    assert iv.kind == "t" and iv.mean == 2.0
    assert iv.half_width == pytest.approx(4.303 * 1.0 / math.sqrt(3), abs=1e-3)  # t(0.975, 2 df) = 4.303
    frac = scoring.interval([0.25, 0.5, 1.0])  # fractions of several answers found: not a 0/1 score
    assert frac.kind == "t"
    same = scoring.interval([0.3] * 4)
    assert same.kind == "t" and same.low == same.high == pytest.approx(0.3)


def test_no_interval_for_one_sample_or_none():
    one = scoring.interval([0.7])
    assert one.kind == "none" and one.mean == 0.7 and math.isnan(one.low) and math.isnan(one.high)
    assert scoring.interval([1.0]).kind == "none"  # one found answer says nothing about the spread
    empty = scoring.interval([None, float("nan")])
    assert empty.n == 0 and math.isnan(empty.mean)
