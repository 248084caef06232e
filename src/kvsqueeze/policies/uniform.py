"""Uniform budget: every KV head of every layer keeps the same number of tokens (the default)."""

from __future__ import annotations

import torch

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import Budget
from kvsqueeze.spec import register


@register
class UniformBudget(Budget):
    name = "uniform"
    family = "budget"
    paper = "uniform per-head budget (default)"

    def allocate(self, scores: torch.Tensor, keep_per_head: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        return keep_per_head[:, None].expand(-1, scores.shape[1]).clone()
