"""KeyDiff — "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments" (Park et al., arXiv 2504.15364).

Keeps the keys least similar (cosine) to the anchor of the head: distinctive keys are the ones attention can
single out. The paper's anchor is the mean of the L2-normalised keys, ``mu = mean_i(k_i / ||k_i||)``, and a token's
score is ``-cos(mu, k_i)`` (its relaxation of "keep the subset with the smallest pairwise cosine similarity", in
which every key counts once whatever its norm). ``anchor=normalized`` (default) is that rule; ``anchor=raw`` uses
the mean of the raw keys instead, which lets a few large-norm keys (attention sinks) pull the anchor — the reading
kvsqueeze used before, kept for comparison.
Deviation: the paper evicts block by block while streaming the prompt; kvsqueeze scores the whole prompt at once
(the same rule with one block).
"""

from __future__ import annotations

from typing import Literal

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
    anchor: Literal["normalized", "raw"] = "normalized"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        keys = ctx.keys.float()
        weights = ctx.valid[:, None, :, None].float()
        points = F.normalize(keys, dim=-1) if self.anchor == "normalized" else keys
        mean = (points * weights).sum(2, keepdim=True) / weights.sum(2, keepdim=True).clamp(min=1)
        return -F.cosine_similarity(keys, mean, dim=-1)
