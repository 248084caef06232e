"""PrefixKV — "PrefixKV: Adaptive Prefix KV Cache is What Vision Instruction-Following Models Need for Efficient
Generation" (Wang et al., arXiv 2412.03409).

Layers differ in how concentrated their KV importance is. Sort a layer's tokens by importance and keep a
*prefix* of that order; the prefix is sized by a cumulative-importance threshold ``c`` that is *global*: every
layer keeps the fewest tokens whose importance reaches ``c`` of its total, and ``c`` is found by binary search
so that the layers' retained sizes average to the target ratio (the "global prefix configuration"). The paper
estimates this configuration offline on a few samples and reuses it — which is what makes it compatible with
compressing layers one at a time: every layer recomputes the same search from the stored profiles and
``(num_layers, keep, n)`` and takes its own size.

Profiles (per-layer Lorenz curves of observation-window attention on essay text) are produced by the same
calibration as RazorAttention's heads (``kvsqueeze calibrate heads``, ``calibration/heads.py``). Composes with
any scorer: ``snapkv+prefixkv``. Within a layer every head gets the layer's size.
Deviations: the paper's importance is the model's attention on its own calibration data (vision-language
instructions); here the observation-window attention on the offline essays; the scorer's protected tokens
(observation window) are kept on top of the prefix in every layer, the prefix ratio applies to the rest;
integer sizes by largest remainder so the total is exact; sizes are capped at the real tokens.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvsqueeze.calibration.heads import load_head_scores
from kvsqueeze.core.context import LayerContext
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policies.base import Budget
from kvsqueeze.policies.pyramidkv import protected_count
from kvsqueeze.spec import register


def retained_fraction(curves: torch.Tensor, c: float) -> torch.Tensor:
    """Per layer, the smallest retention fraction whose cumulative importance reaches ``c`` (interpolated)."""
    layers, points = curves.shape
    grid = torch.linspace(0, 1, points)
    out = torch.empty(layers)
    for i, curve in enumerate(curves):
        j = int(torch.searchsorted(curve.contiguous(), torch.tensor(c)).clamp(max=points - 1))
        if j == 0:
            out[i] = 0.0
            continue
        lo, hi = float(curve[j - 1]), float(curve[j])
        t = 0.0 if hi <= lo else (c - lo) / (hi - lo)
        out[i] = grid[j - 1] + min(max(t, 0.0), 1.0) * (grid[j] - grid[j - 1])
    return out


def prefix_sizes(curves: torch.Tensor, free: int, cap: int, iters: int = 40) -> list[int]:
    """Per-layer token counts (beyond the protected ones) with Σ = ``layers × free``, found by binary search on
    the global cumulative-importance threshold."""
    layers = curves.shape[0]
    if cap <= 0:
        return [0] * layers
    target = min(free / cap, 1.0)
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if float(retained_fraction(curves, mid).mean()) < target:
            lo = mid
        else:
            hi = mid
    ideal = (retained_fraction(curves, hi) * cap).clamp(max=cap)
    ideal = ideal * (layers * free / float(ideal.sum())) if float(ideal.sum()) > 0 else torch.full((layers,), free)
    base = [min(int(x), cap) for x in ideal]
    rest = layers * free - sum(base)
    order = sorted(range(layers), key=lambda i: (-(float(ideal[i]) - base[i]), i))
    i = 0
    while rest > 0 and i < 4 * layers:
        j = order[i % layers]
        if base[j] < cap:
            base[j] += 1
            rest -= 1
        i += 1
    return base


@register
class PrefixKVBudget(Budget):
    name = "prefixkv"
    family = "budget"
    paper = (
        "PrefixKV: Adaptive Prefix KV Cache is What Vision Instruction-Following Models Need for Efficient Generation"
    )
    arxiv = "2412.03409"
    profile: str = ""  # calibration JSON path or model name ('' = the embedded model)
    iters: int = Field(40, ge=1)

    def allocate(self, scores: torch.Tensor, keep_per_head: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        curves = ctx.shared.get("prefix_curves")  # one copy per cache, read by every layer
        if curves is None:
            data = load_head_scores(self.profile)
            if "prefix_curves" not in data:
                raise KVSqueezeError("this calibration has no PrefixKV profile; rerun `kvsqueeze calibrate heads`")
            curves = torch.tensor(data["prefix_curves"], dtype=torch.float32)
            if curves.shape[0] != ctx.num_layers:
                raise KVSqueezeError(
                    f"PrefixKV profile has {curves.shape[0]} layers but the model has {ctx.num_layers}; "
                    "calibrate this model"
                )
            ctx.shared["prefix_curves"] = curves
        B, H, _ = scores.shape
        prot = protected_count(scores.masked_fill(~ctx.valid[:, None, :], 0.0))
        n_real = ctx.valid.sum(-1)
        out = torch.empty(B, H, dtype=torch.long, device=scores.device)
        for b in range(B):
            k, n = int(keep_per_head[b]), int(n_real[b])
            p = min(int(prot[b]), k)
            memo = ctx.scratch.setdefault("prefixkv", {})  # the same search serves every layer of a prefill
            key = (k, n, p, id(curves))
            if key not in memo:
                memo[key] = prefix_sizes(curves, k - p, n - p, self.iters)
            sizes = memo[key]
            out[b] = p + sizes[ctx.layer_idx]
        return out
