"""PyramidKV — "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
(Cai et al., arXiv 2406.02069).

Layer budgets form an arithmetic sequence that decreases with depth (attention funnels from broad in low
layers to a few tokens in high layers) while the total over layers equals the uniform total. For ``m`` layers
with average per-head budget ``k`` (excluding the tokens the scorer always keeps, e.g. SnapKV's window):
top layer ``k_top = k / beta``, bottom layer ``k_0 = 2k − k_top``, layer ``i``: ``k_0 − (k_0 − k_top) · i/(m−1)``
(``beta = 20`` in the paper). Every layer additionally keeps the scorer's protected tokens, as in the paper
where the observation window is kept in every layer. Within a layer every head gets the layer's budget.

Short prompts (``short_prompt``): the paper's reference implementation builds the pyramid only when the prompt
holds at least twice the free budget (``n >= 2k``, i.e. roughly ratio >= 0.5); for a shorter prompt every layer
keeps the uniform budget (plain SnapKV), and when the bottom layer's budget would exceed the prompt it is set to
the prompt and the top to ``2k - n_prefix`` (still linear). ``short_prompt=uniform`` (default) follows that;
``short_prompt=pyramid`` keeps a pyramid at every ratio, capping each layer at the real tokens and handing the
excess to the other layers in pyramid order (kvsqueeze's earlier reading; the paper's text describes only the
pyramid).

Mapping onto kvsqueeze: layers are compressed one at a time, so each layer recomputes the whole schedule
from ``(num_layers, keep, protected, n_real)`` — deterministic, no state — and takes its own entry.
Deviations: integer budgets by largest-remainder rounding (exact total; the reference floors a common step, so
its total falls a few tokens short); ``num_layers`` counts every layer of the model, so on models with sliding
layers that are never compressed (Gemma-3) the full-attention layers are a sub-sequence of the pyramid.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import PROTECTED, Budget
from kvsqueeze.spec import register


def pyramid_budgets(
    num_layers: int, keep: int, protected: int, n_real: int, beta: float, short_prompt: str = "uniform"
) -> list[int]:
    """Per-layer per-head budgets (protected tokens included); sum = ``num_layers × keep`` exactly.

    ``short_prompt="uniform"``: as the reference implementation, the uniform budget on every layer when
    ``n_real < 2 * (keep - protected)``; ``"pyramid"``: a pyramid at every prompt length (see the module)."""
    m = num_layers
    free = keep - protected  # average budget beyond the always-kept tokens
    cap = n_real - protected
    if m == 1 or free <= 0:
        return [keep] * m
    if short_prompt == "uniform" and n_real < 2 * free:
        return [keep] * m
    top = free / beta
    bottom = 2 * free - top
    if short_prompt == "uniform" and bottom > cap:  # the reference: bottom = the whole prefix, same total
        bottom, top = cap, 2 * free - cap
    ideal = [bottom - (bottom - top) * i / (m - 1) for i in range(m)]
    base = [int(x) for x in ideal]
    remainder = m * free - sum(base)
    order = sorted(range(m), key=lambda i: (-(ideal[i] - base[i]), i))
    for i in order[:remainder]:
        base[i] += 1
    # cap at the real tokens; hand the excess to later (then earlier) layers that still have room
    excess = 0
    for i in range(m):
        if base[i] > cap:
            excess += base[i] - cap
            base[i] = cap
    i = 0
    while excess > 0 and i < 2 * m:
        j = i % m
        room = cap - base[j]
        give = min(room, excess)
        base[j] += give
        excess -= give
        i += 1
    return [protected + b for b in base]


def protected_count(scores: torch.Tensor) -> torch.Tensor:
    """Tokens marked ``PROTECTED`` per row (most over the heads): ``[B]``."""
    return (scores == PROTECTED).sum(-1).max(-1).values


@register
class PyramidKVBudget(Budget):
    name = "pyramidkv"
    family = "budget"
    paper = "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
    arxiv = "2406.02069"
    beta: float = Field(20.0, gt=1.0)
    short_prompt: Literal["uniform", "pyramid"] = "uniform"

    def allocate(self, scores: torch.Tensor, keep_per_head: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        B, H, _ = scores.shape
        prot = protected_count(scores.masked_fill(~ctx.valid[:, None, :], 0.0))
        n_real = ctx.valid.sum(-1)
        out = torch.empty(B, H, dtype=torch.long, device=scores.device)
        for b in range(B):
            k, p = int(keep_per_head[b]), min(int(prot[b]), int(keep_per_head[b]))
            budgets = pyramid_budgets(ctx.num_layers, k, p, int(n_real[b]), self.beta, self.short_prompt)
            out[b] = budgets[ctx.layer_idx]
        return out
