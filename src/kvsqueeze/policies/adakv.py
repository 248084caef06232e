"""Ada-KV — "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference"
(Feng et al., arXiv 2407.11550).

Head-wise adaptive budget: the layer's budget ``H × k`` is spent on the highest scores across *all* KV heads
of the layer (one global top-k over the flattened ``[H, L]`` scores), so heads with concentrated attention
give up slots to heads with dispersed attention. The paper's safeguard ("fail-safe") first reserves
``floor(alpha × k)`` slots for every head (its own top tokens; ``alpha = 0.2`` in the paper), then the global
top-k fills the remaining ``H × k − H × floor(alpha × k)`` slots.

Composes with any scorer (``snapkv+adakv``). Scores are compared across heads as they are: the paper uses
softmax attention (SnapKV/Pyramid votes), which is comparable across heads; other scorers' scales are not
normalised (deviation: none for attention scorers; with e.g. ``knorm`` the comparison is the raw score).
Deviations: GQA — the paper's GQA variant averages votes over each KV group, which SnapKV here already
does; tokens marked ``PROTECTED`` (observation window) win the global top-k first, as in the paper where the
window is always kept. Counts never exceed a head's real tokens; Σ counts = ``H × k`` exactly per row.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import Budget
from kvsqueeze.spec import register


def safeguard(keep: int, alpha: float) -> int:
    """Slots reserved for each head: ``floor(alpha × keep)``."""
    return math.floor(alpha * keep + 1e-9)


@register
class AdaKVBudget(Budget):
    name = "adakv"
    family = "budget"
    paper = "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference"
    arxiv = "2407.11550"
    alpha: float = Field(0.2, ge=0.0, le=1.0)

    def allocate(self, scores: torch.Tensor, keep_per_head: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        B, H, L = scores.shape
        scores = scores.float().masked_fill(~ctx.valid[:, None, :], float("-inf"))
        n_valid = ctx.valid.sum(-1)
        counts = torch.zeros(B, H, dtype=torch.long, device=scores.device)
        for b in range(B):
            k = int(keep_per_head[b])
            n = int(n_valid[b])
            guard = min(safeguard(k, self.alpha), n)
            row = scores[b]  # [H, L]
            rest = row.clone()
            if guard:
                top = torch.topk(row, guard, dim=-1).indices  # each head's own best tokens
                rest.scatter_(-1, top, float("-inf"))
            extra = H * k - H * guard
            if extra > 0:
                # global top-k over the remaining (valid) scores of all heads; -inf = reserved or padding
                flat = rest.flatten()
                avail = int(torch.isfinite(flat).sum() + (flat == float("inf")).sum())
                chosen = torch.topk(flat, min(extra, avail)).indices
                per_head = torch.bincount(chosen // L, minlength=H)
                counts[b] = guard + per_head
            else:
                counts[b] = guard
        return counts
