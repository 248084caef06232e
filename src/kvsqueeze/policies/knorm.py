"""Knorm — "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(Devoto et al., arXiv 2406.11430).

Keys with a low L2 norm draw high attention, so the tokens with the lowest key norm are kept.
No deviation: the rule needs no queries and applies per KV head.
"""

from __future__ import annotations

import torch

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import Scorer
from kvsqueeze.spec import register


@register
class KNorm(Scorer):
    name = "knorm"
    family = "eviction"
    paper = "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
    arxiv = "2406.11430"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return -ctx.keys.float().norm(dim=-1)
