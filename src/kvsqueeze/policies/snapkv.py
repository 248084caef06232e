"""SnapKV — "SnapKV: LLM Knows What You are Looking for Before Generation" (Li et al., arXiv 2404.14469).

Each head votes with the attention of the last ``window`` queries (the observation window); votes are
summed over the window, smoothed by 1-D pooling (``kernel``) so neighbours of important tokens survive,
and the top-k prefix tokens are kept together with the whole window.
As in the paper's reference code, only the prefix (the tokens before the window) is pooled: the window's own
votes never leak into the last prefix tokens' scores, and the pooling's zero padding counts in the average at
the prefix's ends (``avg_pool1d`` defaults).
Deviation: for GQA models the votes are averaged over the query heads of each KV group (the paper is MHA).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import PROTECTED, Scorer, prefill_memo
from kvsqueeze.spec import register


def pool_scores(scores: torch.Tensor, kernel: int, mode: str, count_include_pad: bool = False) -> torch.Tensor:
    """1-D pooling over the token axis of ``[B, H, L]`` with 'same' padding (``count_include_pad``: average edge
    tokens over the whole kernel, padding zeros included, instead of over the neighbours that exist)."""
    if kernel <= 1:
        return scores
    B, H, L = scores.shape
    if L == 0:
        return scores
    flat = scores.reshape(B * H, 1, L)
    if mode == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=count_include_pad)
    return pooled[..., :L].reshape(B, H, L)


@register
class SnapKV(Scorer):
    name = "snapkv"
    family = "eviction"
    paper = "SnapKV: LLM Knows What You are Looking for Before Generation"
    arxiv = "2404.14469"
    window: int = Field(32, ge=1)
    kernel: int = Field(5, ge=1)
    pool: Literal["avg", "max"] = "avg"

    def protected(self, length: int) -> int:
        return min(self.window, length)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        votes = prefill_memo(  # [B, Hq, L]
            ctx, f"snapkv.votes:{self.window}", lambda: ctx.window_attention(self.window).sum(dim=2)
        )
        votes = ctx.per_kv_head(votes)
        w = min(self.window, ctx.length)
        prefix = pool_scores(votes[..., : ctx.length - w], self.kernel, self.pool, count_include_pad=True)
        return torch.cat([prefix, torch.full_like(votes[..., ctx.length - w :], PROTECTED)], dim=-1)
