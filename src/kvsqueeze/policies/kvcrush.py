"""KVCrush — "KVCrush: Key value cache size-reduction using similarity in head-behaviour"
(Jha et al., arXiv 2503.00022).

Each token gets a compact *head-behaviour* representation: one bit per attention head, set when that head
attends to the token (here: the head's observation-window attention to it is at least the head's mean).
A base importance method keeps most of the budget; KVCrush spends the rest (``crush`` fraction) on
representatives of the tokens the base method would evict: those tokens are ordered by the Hamming distance
of their bit vectors to an *anchor* vector, the order is cut into as many equal buckets as there are slots,
and one token per bucket (the first) is kept — so every behaviour group keeps a proxy in the cache.

Mapping and deviations: the base method is SnapKV's pooled window votes summed over the layer's heads, and the
kept set is shared by every KV head of the layer (the representation spans all heads); the observation window
is always kept; the bit threshold is the per-head mean attention; the anchor is a fixed alternating 0/1
vector by default (``anchor = "ones" | "alternate" | "random"``; the paper compares several anchors).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import PROTECTED, Scorer
from kvsqueeze.policies.snapkv import pool_scores
from kvsqueeze.spec import register


def head_bits(votes: torch.Tensor) -> torch.Tensor:
    """``votes [Hq, L]`` → bits ``[L, Hq]``: head ``h`` attends to token ``t`` at least as much as on average."""
    return (votes >= votes.mean(-1, keepdim=True)).t()


def representatives(bits: torch.Tensor, candidates: torch.Tensor, slots: int, anchor: torch.Tensor) -> torch.Tensor:
    """Indices (into the token axis) of ``slots`` representatives of ``candidates`` (bool ``[L]``): sort the
    candidates by Hamming distance to ``anchor``, cut into ``slots`` equal buckets, keep each bucket's first."""
    idx = candidates.nonzero().flatten()
    if slots <= 0 or idx.numel() == 0:
        return idx[:0]
    dist = (bits[idx] != anchor[None, :]).sum(-1)
    order = idx[torch.argsort(dist, stable=True)]
    slots = min(slots, order.numel())
    starts = torch.div(torch.arange(slots) * order.numel(), slots, rounding_mode="floor")
    return order[starts]


@register
class KVCrush(Scorer):
    name = "kvcrush"
    family = "structured"
    paper = "KVCrush: Key value cache size-reduction using similarity in head-behaviour"
    arxiv = "2503.00022"
    crush: float = Field(0.25, ge=0.0, le=1.0)  # share of the non-window budget spent on representatives
    window: int = Field(32, ge=1)
    kernel: int = Field(5, ge=1)
    anchor: Literal["ones", "alternate", "random"] = "alternate"

    def protected(self, length: int) -> int:
        return min(self.window, length)

    def _anchor(self, n_heads: int, device) -> torch.Tensor:
        if self.anchor == "ones":
            return torch.ones(n_heads, dtype=torch.bool, device=device)
        if self.anchor == "alternate":
            return torch.arange(n_heads, device=device) % 2 == 0
        g = torch.Generator().manual_seed(0)
        return (torch.rand(n_heads, generator=g) < 0.5).to(device)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        votes = ctx.window_attention(self.window).sum(2)  # [B, Hq, L]
        B, Hq, L = votes.shape
        H = ctx.keys.shape[1]
        w = min(self.window, L)
        base = pool_scores(ctx.per_kv_head(votes), self.kernel, "avg").sum(1)  # [B, L], shared by the heads
        keep = ctx.keep if ctx.keep is not None else ctx.valid.sum(-1)
        anchor = self._anchor(Hq, votes.device)
        out = torch.empty(B, L, device=votes.device)
        for b in range(B):
            body = ctx.valid[b].clone()
            body[L - w :] = False
            free = max(int(keep[b]) - w, 0)
            slots = round(self.crush * free)
            n_base = free - slots
            s = base[b].masked_fill(~body, float("-inf"))
            top = torch.topk(s, min(n_base, int(body.sum()))).indices
            chosen = torch.zeros(L, dtype=torch.bool, device=votes.device)
            chosen[top] = True
            reps = representatives(head_bits(votes[b]), body & ~chosen, slots, anchor)
            # ranks: representatives and base tokens first (kept), then the rest by base score
            norm = base[b] / base[b].abs().amax().clamp(min=1e-30)  # in [-1, 1]
            score = norm.clone()
            score[top] = 2.0 + norm[top]
            score[reps] = 4.0
            score[L - w :] = PROTECTED
            out[b] = score.masked_fill(~ctx.valid[b], float("-inf"))
        return out[:, None, :].expand(B, H, L).clone()
