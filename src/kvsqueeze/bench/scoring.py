"""Scores: RULER / kvpress string matching, log-likelihoods, distribution fidelity, and confidence intervals.

- ``string_match_all`` (RULER): the fraction of expected strings found in the output, case-insensitive.
- ``string_match_part`` (RULER, kvpress' QA scorers): 1 if any expected string is found, else 0.
- ``gold_loglik``: sum and per-token mean of the log-probabilities of the gold answer's tokens.
- ``fidelity``: mean ``KL(full ‖ compressed)`` of next-token distributions and top-1 agreement.
- ``mean_ci``: mean and the half-width of a two-sided 95 % Student-t confidence interval.
"""

from __future__ import annotations

import math

import torch

# two-sided 95 % Student-t quantiles for 1..30 degrees of freedom; 1.96 beyond
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


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


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95 % confidence half-width (Student t; 0 for fewer than 2 values)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan
    mean = sum(vals) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    return mean, t * sd / math.sqrt(n)
