"""H2O — "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
(Zhang et al., arXiv 2306.14048).

Score = attention accumulated over every query of the prompt (column sums of the causal attention
matrix, averaged over the query heads of a KV group); the most recent ``recent_fraction`` of the budget
is kept as the recent window, the rest goes to the heavy hitters (the paper splits the budget evenly).
Deviations: one-shot at prefill; the paper's greedy per-step eviction during decoding is the
``interval:every=1`` schedule composed with ``h2o``. GQA: scores averaged over each KV group.
"""

from __future__ import annotations

import torch

from kvsqueeze.policies.base import PROTECTED, LayerContext, Scorer
from kvsqueeze.spec import register


def accumulated_attention(ctx: LayerContext, chunk: int = 512) -> torch.Tensor:
    """Σ over queries of softmax attention, per query head: ``[B, Hq, L]`` (chunked over queries)."""
    q = ctx.require_queries("h2o", ctx.length)
    B, Hq, L, _ = q.shape
    keys = ctx.keys.repeat_interleave(ctx.groups, dim=1)
    total = torch.zeros(B, Hq, L, dtype=torch.float32, device=q.device)
    cols = torch.arange(L, device=q.device)
    for start in range(0, L, chunk):
        stop = min(start + chunk, L)
        logits = torch.matmul(q[:, :, start:stop], keys.transpose(-1, -2)).float() * ctx.scaling
        visible = (cols[None, :] <= torch.arange(start, stop, device=q.device)[:, None])[None, None]
        visible = visible & ctx.valid[:, None, None, :] & ctx.valid[:, None, start:stop, None]
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        total += probs.sum(dim=2)
    return total


@register
class H2O(Scorer):
    name = "h2o"
    family = "eviction"
    paper = "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
    arxiv = "2306.14048"
    recent_fraction: float = 0.5

    def score(self, ctx: LayerContext) -> torch.Tensor:
        score = ctx.per_kv_head(accumulated_attention(ctx))
        if ctx.keep is not None and self.recent_fraction > 0:
            rank_from_end = ctx.valid.long().flip(-1).cumsum(-1).flip(-1)  # 1 = last real token
            recent = (ctx.keep.float() * self.recent_fraction).floor().long()
            is_recent = ctx.valid & (rank_from_end <= recent[:, None])
            score = score.masked_fill(is_recent[:, None, :], PROTECTED)
        return score
