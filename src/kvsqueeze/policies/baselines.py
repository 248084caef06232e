"""Baselines: ``none`` (keep everything) and ``random`` (uniformly random eviction)."""

from __future__ import annotations

import torch

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import Scorer
from kvsqueeze.spec import register


@register
class NoEviction(Scorer):
    """Keep every token. With the dense codec the cache is exactly transformers' ``DynamicCache``."""

    name = "none"
    family = "baseline"
    paper = "full cache (no compression)"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return torch.zeros(ctx.keys.shape[:3], device=ctx.keys.device)


@register
class RandomEviction(Scorer):
    """Keep a uniformly random subset of tokens per head: the floor any method must beat."""

    name = "random"
    family = "baseline"
    paper = "random eviction baseline"
    seed: int = 0

    def score(self, ctx: LayerContext) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.layer_idx)
        return torch.rand(ctx.keys.shape[:3], generator=gen).to(ctx.keys.device)
