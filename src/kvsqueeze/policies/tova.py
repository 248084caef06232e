"""TOVA — "Transformers are Multi-State RNNs" (Oren et al., arXiv 2401.06104).

Token Omission Via Attention: keep the tokens the last query attends to most. The paper averages the
last query's attention over all heads of a layer, so every head of a layer keeps the same tokens
(``per_head=true`` scores each KV group separately instead). In the paper and its reference implementation the
last token competes like every other (its own attention weight is its score), so it can be dropped when the
last query barely attends to itself: ``protect_last=false`` (default). ``protect_last=true`` always keeps it (as
kvpress' TOVA does), a defensible reading since the newest token is what the next query most likely needs.
Deviation: one-shot at prefill; the paper's per-step policy is ``tova+interval:every=1``.
"""

from __future__ import annotations

import torch

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import PROTECTED, Scorer
from kvsqueeze.spec import register


@register
class TOVA(Scorer):
    name = "tova"
    family = "eviction"
    paper = "Transformers are Multi-State RNNs"
    arxiv = "2401.06104"
    per_head: bool = False
    protect_last: bool = False

    def protected(self, length: int) -> int:
        return 1 if self.protect_last and length else 0

    def score(self, ctx: LayerContext) -> torch.Tensor:
        last = ctx.window_attention(1)[:, :, 0]  # [B, Hq, L]
        if self.per_head:
            scores = ctx.per_kv_head(last)
        else:
            scores = last.mean(dim=1, keepdim=True).expand(-1, ctx.keys.shape[1], -1)
        if self.protect_last:
            scores = scores.clone()
            scores[..., -1] = PROTECTED
        return scores
