"""KVMerger — "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on Long-Context Tasks"
(Wang et al., arXiv 2407.08454).

Merging sets are runs of *consecutive* tokens whose keys are similar (cosine similarity of neighbours
``>= threshold``, per KV head). Tokens are chosen by H2O's accumulated attention (with H2O's recent window);
every evicted token of a merging set is folded into the set's *pivot* — its kept token with the highest
score — by Gaussian-kernel weights::

    w_e = exp(-||k_p - k_e||^2 / (2 sigma^2)),   k_p' = (k_p + sum_e w_e k_e) / (1 + sum_e w_e)

and the same weights for the values. Evicted tokens whose set has no kept token are dropped.

Deviations: the merging-set search is the greedy neighbour rule above (the paper's set identification is
a constrained clustering with the same intent); ``sigma`` is a fixed parameter; GQA: per KV head; the kept
count is the budget (merging folds evicted tokens in, it does not add tokens).
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.h2o import H2O
from kvsqueeze.spec import register


def merging_sets(keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """Set id ``[L]`` of each token: a new set starts wherever neighbour cosine similarity drops below ``threshold``."""
    sim = torch.nn.functional.cosine_similarity(keys[:-1].float(), keys[1:].float(), dim=-1)
    starts = torch.cat([torch.ones(1, dtype=torch.long, device=keys.device), (sim < threshold).long()])
    return starts.cumsum(0) - 1


def gaussian_merge(
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    scores: torch.Tensor,
    sets: torch.Tensor,
    sigma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold each evicted token into its set's pivot (highest-scoring kept token) with Gaussian weights."""
    L = keys.shape[0]
    n_sets = int(sets.max()) + 1 if L else 0
    s = scores.float().masked_fill(~keep, float("-inf"))
    best = torch.full((n_sets,), float("-inf"), device=keys.device).scatter_reduce(0, sets, s, "amax")
    idx = torch.arange(L, device=keys.device)
    is_pivot = keep & (s == best[sets])
    pivot = torch.full((n_sets,), L, device=keys.device).scatter_reduce(0, sets[is_pivot], idx[is_pivot], "amin")
    p = pivot[sets]
    merge = ~keep & (p < L)
    if not bool(merge.any()):
        return keys, values
    e, pe = idx[merge], p[merge]
    w = torch.exp(-(keys[pe].float() - keys[e].float()).pow(2).sum(-1) / (2 * sigma**2))
    num_k = torch.zeros_like(keys, dtype=torch.float32).index_add_(0, pe, w[:, None] * keys[e].float())
    num_v = torch.zeros_like(values, dtype=torch.float32).index_add_(0, pe, w[:, None] * values[e].float())
    den = torch.zeros(L, device=keys.device).index_add_(0, pe, w)
    new_k = ((keys.float() + num_k) / (1 + den[:, None])).to(keys.dtype)
    new_v = ((values.float() + num_v) / (1 + den[:, None])).to(values.dtype)
    return new_k, new_v


@register
class KVMerger(H2O):
    name = "kvmerger"
    family = "merging"
    paper = "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on Long-Context Tasks"
    arxiv = "2407.08454"
    threshold: float = Field(0.8, ge=-1.0, le=1.0)
    sigma: float = Field(5.0, gt=0)

    def merge(self, ctx: LayerContext, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        scores = self.score(ctx) if "acc" not in ctx.state else ctx.state["acc"]
        keys, values = ctx.keys.clone(), ctx.values.clone()
        B, H, _ = keep.shape
        for b in range(B):
            real = ctx.valid[b]
            for h in range(H):
                k, v = ctx.keys[b, h][real], ctx.values[b, h][real]
                sets = merging_sets(k, self.threshold)
                mk, mv = gaussian_merge(k, v, keep[b, h][real], scores[b, h][real], sets, self.sigma)
                keys[b, h][real], values[b, h][real] = mk, mv
        return keys, values
