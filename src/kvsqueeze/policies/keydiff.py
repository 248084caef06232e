"""KeyDiff — "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments" (Park et al., arXiv 2504.15364).

Keeps the keys least similar (cosine) to the anchor, the mean key of the head: distinctive keys are
the ones attention can single out. Deviation: the paper evicts block by block while streaming the
prompt; kvsqueeze scores the whole prompt at once (the same rule with one block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import Scorer
from kvsqueeze.spec import register


@register
class KeyDiff(Scorer):
    name = "keydiff"
    family = "eviction"
    paper = (
        "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference "
        "in Resource-Constrained Environments"
    )
    arxiv = "2504.15364"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        keys = ctx.keys.float()
        weights = ctx.valid[:, None, :, None].float()
        anchor = (keys * weights).sum(2, keepdim=True) / weights.sum(2, keepdim=True).clamp(min=1)
        return -F.cosine_similarity(keys, anchor, dim=-1)
