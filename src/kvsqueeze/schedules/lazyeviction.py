"""LazyEviction — "LazyEviction: Lagged KV Eviction with Attention Pattern Observation for Efficient Long
Reasoning" (Zhang et al., arXiv 2506.15969).

Token Importance Recurrence: many tokens regain attention after many decoding steps. LazyEviction tracks,
per held token and KV head, the step it was last *activated* (attention above a threshold) and its
**maximum recurrence interval** (MRI, the longest gap seen between two activations, counting from the
token's own step). Eviction is lagged: nothing is evicted until ``window`` new tokens have been observed
(the cache then holds ``budget + window``), and the newest ``window`` tokens (the observation window) are
never evicted in that round. Among the rest, tokens are kept by ``MRI - (now - last)``: a token whose
silence already exceeds its largest recurrence interval is unlikely to recur and goes first; one whose MRI
is long and was active recently stays.

Deviations (reconstructed from the paper's description; state them when comparing):
- activation rule: mean attention over the query heads of a KV group ``>= alpha / n`` (``n`` = tokens the
  query sees, i.e. ``alpha`` times the uniform share); the paper's threshold may differ;
- priority score is the single number ``MRI - (now - last)`` (ties broken by position, newest kept);
- the prompt is tracked with its own causal attention at prefill, then compressed to ``budget`` at once;
- GQA: statistics per KV head; RoPE positions are the step clock.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from kvsqueeze.core.compressor import aligned
from kvsqueeze.core.context import DecodeStep, LayerContext, per_kv_head
from kvsqueeze.schedules.base import DecodingSchedule, OwnRule
from kvsqueeze.spec import register


def fold_activations(
    active: torch.Tensor, step: torch.Tensor, last: torch.Tensor, mri: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query step: tokens ``active`` (bool, like ``last``) at ``step`` close an interval ``step - last``;
    ``mri`` keeps the largest interval and ``last`` becomes ``step``. Returns ``(last, mri)``."""
    gap = (step - last).clamp(min=0)
    return torch.where(active, step.expand_as(last), last), torch.where(active, torch.maximum(mri, gap), mri)


@register
class LazyEviction(OwnRule, DecodingSchedule):
    name = "lazyeviction"
    family = "schedule"
    paper = "LazyEviction: Lagged KV Eviction with Attention Pattern Observation for Efficient Long Reasoning"
    arxiv = "2506.15969"
    needs_attention: ClassVar[bool] = True
    alpha: float = Field(1.0, gt=0)

    def lag(self) -> int:  # the observation window is the eviction lag
        return self.window

    def protected_recent(self) -> int:
        return self.window

    def observe(self, state: dict, step: DecodeStep) -> None:
        keys, valid, probs = step.keys, step.valid, step.probs
        B, H, L, _ = keys.shape
        M = probs.shape[2]
        pos = state["pos"]  # [B, H, L]
        aligned(state, "last", "mri")
        if step.first or "last" not in state:
            last, mri = pos.clone(), torch.zeros_like(pos)
        else:
            pad = L - state["last"].shape[-1]
            last = torch.cat([state["last"], pos[..., -pad:]], dim=-1) if pad else state["last"]
            mri = torch.nn.functional.pad(state["mri"], (0, pad)) if pad else state["mri"]
        att = per_kv_head(probs, H)  # [B, H, M, L]
        seen = torch.arange(L - M, L, device=keys.device)[:, None] >= torch.arange(L, device=keys.device)[None, :]
        n_seen = (seen[None] & valid[:, None, :]).sum(-1).clamp(min=1)  # [B, M]
        active = (att >= self.alpha / n_seen[:, None, :, None]) & seen[None, None] & valid[:, None, None, :]
        steps = step.positions[:, None, :, None].expand(B, H, M, 1)  # [B, H, M, 1]
        for i in range(M):
            last, mri = fold_activations(active[:, :, i], steps[:, :, i], last, mri)
        state["last"], state["mri"] = last, mri

    def score(self, ctx: LayerContext) -> torch.Tensor:
        state = ctx.state
        now = state["pos"].max(dim=-1, keepdim=True).values
        slack = (state["mri"] - (now - state["last"])).float()
        return slack + state["pos"].float() * 1e-6  # tie-break: newer first
