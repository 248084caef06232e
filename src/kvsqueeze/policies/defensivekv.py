"""DefensiveKV and Layer-DefensiveKV — "Taming the Fragility of KV Cache Eviction in LLM Inference"
(Feng et al., arXiv 2510.13334).

Eviction methods *aggregate* per-query importance (one score per observation query) into one score per token,
almost always by the mean, trusting that the important tokens stay the same over time. Defensive aggregation
controls the worst case instead, in two linear-time steps:

1. worst-case risk: a token's score is the *maximum* importance any observation query (and any query head of
   its KV group) gave it — a token that mattered once is assumed to matter again;
2. adaptive prior correction: scores are raised to at least the head's mean score (``clamp(min=mean)``), a
   prior risk for tokens the few observed queries happened not to look at.

``defensivekv`` spends the budget head-adaptively (Ada-KV's global top-k over the layer's heads with its
safeguard, as the paper builds on Ada-CriticalKV); ``layer_defensivekv`` additionally lets layers compete —
the paper's AdaKV-style allocation over all layers' scores at once.
Deviations: (1) per-query importance is the softmax attention of the last ``window`` queries; the paper's base
scorer (CriticalKV) also multiplies by the norm of the output-projected value, which needs the layer's output
projection that the cache does not see. (2) Layer-DefensiveKV's global top-k needs every layer's scores, but
layers are compressed one at a time and never re-evicted: the cross-layer threshold is estimated online
(cache-wide state) as the score that would select the budget spent so far plus this layer's share among all
scores seen so far; each layer keeps its scores above it, never less than Ada-KV's safeguard
(``alpha × keep`` per head), clamped so the remaining layers stay feasible, and the last layer takes the
remainder — the total is exact, the split approximates the paper's. (3) The prior floor makes every
below-mean token equal; the paper leaves that tie to the top-k kernel, here ``tie_break × mean aggregation``
orders them (``tie_break=0`` restores the plain rule). Observation
window tokens are always kept (``PROTECTED``).
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.adakv import AdaKVBudget, safeguard
from kvsqueeze.policies.base import PROTECTED, Scorer
from kvsqueeze.spec import register


def defensive_aggregate(per_query: torch.Tensor, valid: torch.Tensor, tie_break: float = 0.0) -> torch.Tensor:
    """``per_query [B, H, G, w, L]`` importance → ``[B, H, L]``: max over queries and group heads, floored at the
    head's mean over real tokens. ``tie_break`` adds that fraction of the mean aggregation, which orders the
    tokens the floor made equal."""
    worst = per_query.amax(dim=(2, 3))  # [B, H, L]
    real = valid[:, None, :].to(worst.dtype)
    prior = (worst * real).sum(-1, keepdim=True) / real.sum(-1, keepdim=True).clamp(min=1)
    scores = worst.clamp(min=prior)
    if tie_break:
        scores = scores + tie_break * per_query.mean(dim=(2, 3))
    return scores


@register
class DefensiveKV(Scorer):
    name = "defensivekv"
    family = "eviction"
    paper = "Taming the Fragility of KV Cache Eviction in LLM Inference"
    arxiv = "2510.13334"
    window: int = Field(32, ge=1)
    alpha: float = Field(0.2, ge=0.0, le=1.0)  # Ada-KV safeguard of the head-wise allocation
    headwise: bool = True
    tie_break: float = Field(1e-3, ge=0.0)  # weight of the mean aggregation that orders tokens tied at the prior

    def protected(self, length: int) -> int:
        return min(self.window, length)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        att = ctx.window_attention(self.window)  # [B, Hq, w, L]
        B, Hq, w, L = att.shape
        scores = defensive_aggregate(att.view(B, Hq // ctx.groups, ctx.groups, w, L), ctx.valid, self.tie_break)
        in_window = torch.zeros_like(ctx.valid)
        in_window[:, -min(self.window, L) :] = True
        return scores.masked_fill(in_window[:, None, :], PROTECTED)

    def counts(self, scores: torch.Tensor, keep_per_head: torch.Tensor, ctx: LayerContext) -> torch.Tensor | None:
        if not self.headwise:
            return None  # the budget axis decides
        return AdaKVBudget(alpha=self.alpha).allocate(scores, keep_per_head, ctx)


def layer_share(
    seen: list[torch.Tensor], spent: int, layer: int, num_layers: int, keep_total: int, lo: int, hi: int, floor: int = 0
):
    """Online cross-layer share of this layer (sum over layers = ``num_layers × keep_total``).

    ``seen``: flattened finite scores of layers ``0..layer`` (this one last); ``keep_total``: ``H × keep``;
    ``lo``: the layer's protected tokens (kept on top of the scores above the threshold); ``hi``: ``H × n``;
    ``floor``: the smallest share a layer may get (Ada-KV's safeguard applied to layers).
    """
    remaining = num_layers * keep_total - spent
    future = num_layers - 1 - layer
    if future == 0:
        share = remaining
    else:
        pool = torch.cat(seen)  # finite (non-protected) scores of the layers seen so far
        k = min(pool.numel(), (layer + 1) * (keep_total - lo))
        threshold = torch.topk(pool, k).values[-1] if k else torch.tensor(float("inf"))
        share = lo + int((seen[-1] >= threshold).sum())
    lo = max(lo, floor)
    share = min(share, hi, remaining - future * lo)
    return max(share, lo, remaining - future * hi)


@register
class LayerDefensiveKV(DefensiveKV):
    name = "layer_defensivekv"
    paper = "Taming the Fragility of KV Cache Eviction in LLM Inference (Layer-DefensiveKV)"

    def counts(self, scores: torch.Tensor, keep_per_head: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        shared = ctx.scratch.setdefault("layer_defensivekv", {"last": -1})
        if ctx.layer_idx <= shared["last"]:
            shared.clear()
            shared["last"] = -1
        shared["last"] = ctx.layer_idx
        B, H, _ = scores.shape
        n_real = ctx.valid.sum(-1).tolist()
        out = torch.empty(B, H, dtype=torch.long, device=scores.device)
        for b in range(B):
            row = shared.setdefault(b, {"seen": [], "spent": 0})
            s = scores[b][:, ctx.valid[b]].float()
            row["seen"].append(s[torch.isfinite(s)].flatten().cpu())
            k, n = int(keep_per_head[b]), int(n_real[b])
            p = min(self.window, n, k)
            guard = H * min(max(p, safeguard(k, self.alpha)), k)  # Ada-KV's safeguard, per layer
            layer_total = layer_share(
                row["seen"], row["spent"], ctx.layer_idx, ctx.num_layers, H * k, H * p, H * n, floor=guard
            )
            row["spent"] += layer_total
            # split the layer's total over its heads head-adaptively (Ada-KV), as DefensiveKV does
            per_head = torch.tensor([layer_total // H + (1 if h < layer_total % H else 0) for h in range(H)])
            ada = AdaKVBudget(alpha=self.alpha).allocate(scores[b : b + 1], per_head[:1], _row_ctx(ctx, b))
            out[b] = _fix_total(ada[0], layer_total, n)
        return out


def _row_ctx(ctx: LayerContext, b: int) -> LayerContext:
    return LayerContext(ctx.layer_idx, ctx.num_layers, ctx.keys[b : b + 1], ctx.values[b : b + 1], None,
                        ctx.valid[b : b + 1], ctx.scaling)  # fmt: skip


def _fix_total(counts: torch.Tensor, total: int, n: int) -> torch.Tensor:
    """Adjust per-head counts (within ``[0, n]``) so that they sum to ``total`` exactly."""
    counts = counts.clone()
    diff = total - int(counts.sum())
    h = 0
    while diff != 0:
        step = 1 if diff > 0 else -1
        if 0 <= int(counts[h]) + step <= n:
            counts[h] += step
            diff -= step
        h = (h + 1) % counts.numel()
    return counts
