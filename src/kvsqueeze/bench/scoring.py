"""Scores: RULER / kvpress string matching, log-likelihoods, distribution fidelity, and confidence intervals.

- ``string_match_all`` (RULER): the fraction of expected strings found in the output, case-insensitive.
- ``string_match_part`` (RULER, kvpress' QA scorers): 1 if any expected string is found, else 0.
- ``gold_loglik``: sum and per-token mean of the log-probabilities of the gold answer's tokens.
- ``fidelity``: mean ``KL(full ‖ compressed)`` of next-token distributions and top-1 agreement.
- ``interval``: mean and a two-sided 95 % confidence interval fitted to the data: Wilson's score interval for 0/1
  scores (a binomial proportion: never outside [0, 1], sensible at n = 2), Student's t for continuous values, and
  none for a single value (one sample says nothing about its spread).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

CONFIDENCE = 0.95


def string_match_all(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in references) / len(references) if references else 0.0


def string_match_part(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    pred = prediction.lower()
    return float(any(ref.lower() in pred for ref in references))


def match(prediction: str, references, metric: str = "all", choices: tuple[str, ...] = ()) -> float:
    """Score an output: RULER's ``all`` / ``part`` string match, or a benchmark's own metric by name
    (``longbench:…``, ``infinitebench:…``; see :mod:`kvsqueeze.bench.metrics`)."""
    if metric == "all":
        return string_match_all(prediction, references)
    if metric == "part":
        return string_match_part(prediction, references)
    from kvsqueeze.bench.metrics import score

    return score(metric, prediction, tuple(references), tuple(choices))


def all_found(prediction: str, references) -> bool:
    """Whether every expected string is already in the output (the score can no longer change)."""
    pred = prediction.lower()
    return all(ref.lower() in pred for ref in references)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token: ``logits [N, V]`` predicting ``targets [N]`` → ``[N]``."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def gold_loglik(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    lp = token_logprobs(logits, targets)
    total = float(lp.sum())
    n = int(lp.numel())
    return {"loglik": total, "loglik_per_token": total / max(n, 1), "gold_tokens": n}


def fidelity(full_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Mean ``KL(p_full ‖ p_compressed)`` (nats) over positions and top-1 agreement; inputs ``[N, V]``."""
    lp_full = torch.log_softmax(full_logits.float(), dim=-1)
    lp = torch.log_softmax(logits.float(), dim=-1)
    kl = (lp_full.exp() * (lp_full - lp)).sum(-1).clamp(min=0.0)
    top1 = (full_logits.argmax(-1) == logits.argmax(-1)).float()
    return {"kl": float(kl.mean()), "top1": float(top1.mean())}


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    nll = -float(token_logprobs(logits, targets).mean())
    return {"nll": nll, "ppl": math.exp(nll)}


IntervalKind = Literal["wilson", "t", "none"]


@dataclass(frozen=True)
class Interval:
    """A mean with its 95 % confidence interval ``[low, high]`` (NaN when ``kind`` is ``"none"``)."""

    mean: float
    low: float
    high: float
    n: int
    kind: IntervalKind

    @property
    def half_width(self) -> float:
        """The larger distance from the mean to an end of the interval (NaN without an interval)."""
        return max(self.mean - self.low, self.high - self.mean)


def is_binary(values: list[float]) -> bool:
    """Whether every value is exactly 0 or 1 (a success/failure score)."""
    return bool(values) and all(v in (0.0, 1.0) for v in values)


def interval(values: list[float], binary: bool | None = None) -> Interval:
    """Mean and 95 % interval of ``values`` (None and NaN dropped): Wilson for 0/1 scores, Student t otherwise,
    no interval for fewer than two values. ``binary``: whether the values are success/failure outcomes (None: when
    every value is 0 or 1 — callers that know a metric is continuous, such as a KL that is 0 for the full cache,
    pass False)."""
    from scipy import stats

    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(vals)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "none")
    mean = sum(vals) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, "none")
    if (binary if binary is not None else is_binary(vals)) and is_binary(vals):
        ci = stats.binomtest(int(sum(vals)), n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
        return Interval(mean, float(ci.low), float(ci.high), n, "wilson")
    sem = stats.sem(vals)
    if sem == 0 or math.isnan(sem):
        return Interval(mean, mean, mean, n, "t")
    low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), n, "t")
