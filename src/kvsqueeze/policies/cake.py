"""CAKE — "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences" (Qin et al., arXiv 2503.12491).

From the attention ``A [w, L]`` of the last ``window`` queries (per head, then averaged over heads):

- spatial dispersion ``H_l = −Σ_j Ā_j log Ā_j`` (entropy of the window-averaged attention),
- temporal shift ``V_l = Σ_j Var_i(A_ij)`` (how much each key's attention moves across the window queries),
- layer preference ``P_l = H_l^(1/τ1) · V_l^(1/τ2)``; layer budgets are proportional to ``P_l`` under the
  global budget (``layers × keep`` tokens per head);
- eviction indicator ``I_j = mean_i A_ij + γ · Var_i A_ij`` (tokens with sustained *or* shifting importance),
  pooled over neighbouring tokens like SnapKV, window tokens always kept.

Cascading: the paper meets the memory bound *during* prefill by re-slicing all layers seen so far each time a
new layer arrives (earlier layers are evicted further), so the final budgets are exactly proportional to the
preferences. kvsqueeze compresses each layer once, as it is produced, and cannot shrink it later, so the
cascade is online (cross-layer state in ``ctx.scratch``, dropped after the last layer): layer ``l`` receives
the share of the *remaining* budget that its preference claims against the layers still to come, whose
preferences are estimated by the
mean preference seen so far — ``B_l = R · P_l / (P_l + (m−1−l) · mean(P_0..P_l))`` — and the last layer takes
what remains. Deviations: that online approximation of the final proportional split (the total is exact, the
split approximates the paper's); budgets are clamped to ``[protected+1, n]`` per layer while keeping the rest
feasible; every head of a layer gets the layer budget (as in the paper); GQA: attention averaged over each KV
group before the statistics. ``gamma`` defaults to 200 and ``tau1 = tau2 = 1``; the paper tunes them per model.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import PROTECTED, Scorer
from kvsqueeze.policies.snapkv import pool_scores
from kvsqueeze.spec import register


def layer_preference(att: torch.Tensor, tau1: float, tau2: float) -> torch.Tensor:
    """Preference per row from window attention ``[B, H, w, L]``: ``H^(1/τ1) · V^(1/τ2)`` averaged over heads."""
    mean = att.mean(2)  # [B, H, L]
    p = mean / mean.sum(-1, keepdim=True).clamp(min=1e-12)
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum(-1)  # [B, H]
    shift = att.var(2, unbiased=False).sum(-1)  # [B, H]
    return (entropy.clamp(min=0) ** (1.0 / tau1) * shift ** (1.0 / tau2)).mean(-1)  # [B]


def cascade_budget(prefs: list[float], layer: int, num_layers: int, keep: int, spent: int, lo: int, hi: int) -> int:
    """Online cascading share of layer ``layer`` (see module docstring); Σ over layers = ``num_layers × keep``."""
    remaining = num_layers * keep - spent
    future = num_layers - 1 - layer
    if future == 0:
        share = remaining
    else:
        p = prefs[-1]
        mean = sum(prefs) / len(prefs)
        denom = p + future * mean
        share = round(remaining * p / denom) if denom > 0 else round(remaining / (future + 1))
    share = min(share, hi, remaining - future * lo)
    return max(share, lo, remaining - future * hi)


@register
class CAKE(Scorer):
    name = "cake"
    family = "budget"
    paper = "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences"
    arxiv = "2503.12491"
    window: int = Field(32, ge=1)
    kernel: int = Field(5, ge=1)
    gamma: float = Field(200.0, ge=0.0)
    tau1: float = Field(1.0, gt=0.0)
    tau2: float = Field(1.0, gt=0.0)

    def protected(self, length: int) -> int:
        return min(self.window, length)

    def _attention(self, ctx: LayerContext) -> torch.Tensor:
        att = ctx.window_attention(self.window)  # [B, Hq, w, L]
        B, Hq, w, L = att.shape
        return att.view(B, Hq // ctx.groups, ctx.groups, w, L).mean(2)  # [B, H, w, L]

    def score(self, ctx: LayerContext) -> torch.Tensor:
        att = self._attention(ctx)
        ctx.state["cake_preference"] = layer_preference(att, self.tau1, self.tau2)
        indicator = att.mean(2) + self.gamma * att.var(2, unbiased=False)
        indicator = pool_scores(indicator, self.kernel, "avg")
        in_window = torch.zeros_like(ctx.valid)
        in_window[:, -min(self.window, ctx.length) :] = True
        return indicator.masked_fill(in_window[:, None, :], PROTECTED)

    def counts(self, scores: torch.Tensor, keep_per_head: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        pref = ctx.state.pop("cake_preference", None)
        if pref is None:
            pref = layer_preference(self._attention(ctx), self.tau1, self.tau2)
        shared = ctx.scratch.setdefault("cake", {"last": -1})
        if ctx.layer_idx <= shared["last"]:  # a new prefill: start the cascade again
            shared.clear()
            shared["last"] = -1
        shared["last"] = ctx.layer_idx
        B, H, _ = scores.shape
        n_real = ctx.valid.sum(-1).tolist()
        lo = min(self.window, ctx.length) + 1
        out = torch.empty(B, H, dtype=torch.long, device=scores.device)
        for b in range(B):
            row = shared.setdefault(b, {"prefs": [], "spent": 0})
            row["prefs"].append(float(pref[b]))
            k, n = int(keep_per_head[b]), int(n_real[b])
            budget = cascade_budget(row["prefs"], ctx.layer_idx, ctx.num_layers, k, row["spent"], min(lo, k), n)
            row["spent"] += budget
            out[b] = budget
        return out
