"""H2O — "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
(Zhang et al., arXiv 2306.14048).

Score = attention accumulated over every query of the prompt (column sums of the causal attention
matrix, averaged over the query heads of a KV group); the most recent ``recent_fraction`` of the budget
is kept as the recent window, the rest goes to the heavy hitters (the paper splits the budget evenly).
Deviations: one-shot at prefill; the paper's greedy per-step eviction during decoding is the
``interval:every=1`` schedule composed with ``h2o``: then :meth:`H2O.observe` accumulates the attention of every
query since the prompt (kept in ``state["acc"]``, aligned with the held tokens) and the score reads it.
GQA: scores averaged over each KV group.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from kvsqueeze.core.compressor import aligned
from kvsqueeze.core.context import DecodeStep, LayerContext, per_kv_head
from kvsqueeze.policies.base import PROTECTED, Scorer, prefill_memo
from kvsqueeze.spec import register


def accumulated_attention(ctx: LayerContext, chunk: int = 256) -> torch.Tensor:
    """Σ over queries of causal softmax attention, per query head: ``[B, Hq, L]``.

    Chunked over queries; a chunk only multiplies the keys it can see (causality halves the work).
    """
    q = ctx.require_queries("h2o", ctx.length)
    B, Hq, L, D = q.shape
    H, G = ctx.keys.shape[1], ctx.groups
    total = torch.zeros(B, H, G, L, dtype=torch.float32, device=q.device)
    padding = ~ctx.valid[:, None, None, None, :]  # [B, 1, 1, 1, L]
    for start in range(0, L, chunk):
        stop = min(start + chunk, L)
        n = stop - start
        grouped = q[:, :, start:stop].reshape(B, H, G * n, D)
        logits = torch.matmul(grouped, ctx.keys[:, :, :stop].transpose(-1, -2)).float().mul_(ctx.scaling)
        logits = logits.view(B, H, G, n, stop)
        future = torch.ones(n, stop, dtype=torch.bool, device=q.device).triu_(start + 1)
        logits.masked_fill_(future | padding[..., :stop], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
        real_queries = ctx.valid[:, start:stop].float()[:, None, None, :, None]
        total[..., :stop] += (probs * real_queries).sum(dim=3)
    return total.view(B, Hq, L)


@register
class H2O(Scorer):
    name = "h2o"
    family = "eviction"
    paper = "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
    arxiv = "2306.14048"
    recent_fraction: float = Field(0.5, ge=0.0, le=1.0)
    needs_attention: ClassVar[bool] = True  # decoding schedules hand observe() the new queries' attention

    def observe(self, state: dict, step: DecodeStep) -> None:
        """Decoding: add the attention of the pass's queries to every held token's accumulated score."""
        gained = per_kv_head(step.probs.sum(2), step.keys.shape[1])  # [B, H, L]
        acc = state.get("acc")
        if acc is None or step.first:
            state["acc"] = gained
        else:
            state["acc"] = torch.nn.functional.pad(acc, (0, gained.shape[-1] - acc.shape[-1])) + gained
        aligned(state, "acc")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        acc = ctx.state.get("acc")
        if acc is not None and acc.shape[-1] == ctx.length:  # decoding: what observe() accumulated
            score = acc.clone()
        else:
            score = ctx.per_kv_head(prefill_memo(ctx, "h2o.accumulated", lambda: accumulated_attention(ctx)))
        if ctx.keep is not None and self.recent_fraction > 0:
            rank_from_end = ctx.valid.long().flip(-1).cumsum(-1).flip(-1)  # 1 = last real token
            recent = (ctx.keep.float() * self.recent_fraction).floor().long()
            is_recent = ctx.valid & (rank_from_end <= recent[:, None])
            score = score.masked_fill(is_recent[:, None, :], PROTECTED)
        return score
