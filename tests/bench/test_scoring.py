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


def test_mean_ci_student_t():
    mean, ci = scoring.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and ci == pytest.approx(4.303 * 1.0 / math.sqrt(3), abs=1e-3)
    assert scoring.mean_ci([5.0]) == (5.0, 0.0)
    assert scoring.mean_ci([1.0] * 50) == (1.0, 0.0)
    m, c = scoring.mean_ci([0.0, 1.0] * 50)  # n = 100 → normal quantile
    assert m == 0.5 and c == pytest.approx(1.96 * math.sqrt(100 / 99 * 0.25) / 10, abs=1e-6)
    assert math.isnan(scoring.mean_ci([])[0])
