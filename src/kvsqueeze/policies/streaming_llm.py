"""StreamingLLM — "Efficient Streaming Language Models with Attention Sinks" (Xiao et al., arXiv 2309.17453).

Keeps the first ``sinks`` tokens (attention sinks) and the most recent tokens that fit the budget.
Deviation: none at prefill; RoPE positions are not re-assigned inside the cache (the paper re-indexes
positions within the cache) — kvsqueeze keeps original positions everywhere, as DESIGN.md requires.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import PROTECTED, Scorer
from kvsqueeze.spec import register


@register
class StreamingLLM(Scorer):
    name = "streaming_llm"
    family = "eviction"
    paper = "Efficient Streaming Language Models with Attention Sinks"
    arxiv = "2309.17453"
    sinks: int = Field(4, ge=0)

    def protected(self, length: int) -> int:
        return min(self.sinks, length)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        rank = ctx.valid.long().cumsum(-1) - 1  # position among the row's real tokens
        score = rank.float().masked_fill(rank < self.sinks, PROTECTED)
        return score[:, None, :].expand(-1, ctx.keys.shape[1], -1)
