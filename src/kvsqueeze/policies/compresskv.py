"""CompressKV — "CompressKV: Semantic Retrieval Heads Know What Tokens are Not Important Before Generation"
(Lin et al., arXiv 2508.02401).

1. *Semantic retrieval heads* (SRHs): heads that attend not only to the exact token being retrieved but to it
   and its surrounding context. They are identified offline; in each layer the ``srh`` best-scoring KV heads
   decide which tokens *every* head of the layer keeps: SnapKV-style votes (observation-window attention,
   pooled) of the SRHs' query heads only, instead of all heads.
2. *Layer-adaptive budgets from each layer's eviction error*, estimated offline: layers whose attention is
   harder to compress get more of the global budget (Σ over layers = ``layers × keep``, exact).

Mapping and deviations: SRH scores come from ``kvsqueeze calibrate heads`` (``calibration/heads.py``: share of
a head's top-8 attention within 4 tokens of the token to copy, on repeated-token probes built from the
essays), not the paper's needle-retrieval tasks. The offline eviction error of a layer is the attention mass
its observation window loses when only the target fraction of tokens is kept (``1 − profile(f)`` from the
same calibration's per-layer profiles), a proxy of the output error the paper measures; budgets are
proportional to it, floored at the scorer's window + 1 and capped at the real tokens, integer by largest
remainder. Every head of a layer keeps the same tokens and the same count.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvsqueeze.calibration.heads import interpolate, load_head_scores
from kvsqueeze.core.context import LayerContext
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policies.base import PROTECTED, Scorer
from kvsqueeze.policies.snapkv import pool_scores
from kvsqueeze.spec import register


def error_budgets(errors: torch.Tensor, keep: int, lo: int, hi: int) -> list[int]:
    """Layer budgets proportional to ``errors`` with Σ = ``layers × keep``, each within ``[lo, hi]``."""
    m = errors.numel()
    total = m * keep
    budgets = torch.full((m,), float(lo))
    free = torch.ones(m, dtype=torch.bool)
    for _ in range(m):  # water-filling: proportional shares, clamped layers leave the pool
        rest = total - float(budgets[~free].sum())
        w = errors.clamp(min=1e-12) * free
        share = rest * w / w.sum()
        budgets = torch.where(free, share, budgets)
        over, under = free & (budgets > hi), free & (budgets < lo)
        if not (over.any() or under.any()):
            break
        budgets = torch.where(over, torch.tensor(float(hi)), torch.where(under, torch.tensor(float(lo)), budgets))
        free &= ~(over | under)
        if not free.any():
            break
    base = [int(x) for x in budgets]
    rest = total - sum(base)
    order = sorted(range(m), key=lambda i: (-(float(budgets[i]) - base[i]), i))
    i = 0
    while rest != 0 and i < 4 * m:
        j = order[i % m]
        step = 1 if rest > 0 else -1
        if lo <= base[j] + step <= hi:
            base[j] += step
            rest -= step
        i += 1
    return base


@register
class CompressKV(Scorer):
    name = "compresskv"
    family = "heads"
    paper = "CompressKV: Semantic Retrieval Heads Know What Tokens are Not Important Before Generation"
    arxiv = "2508.02401"
    heads: str = ""  # calibration JSON path or model name ('' = the embedded model)
    srh: int = Field(1, ge=1)  # semantic retrieval KV heads per layer
    window: int = Field(32, ge=1)
    kernel: int = Field(7, ge=1)

    def protected(self, length: int) -> int:
        return min(self.window, length)

    def _calibration(self, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        cached = ctx.shared.get("compresskv_calibration")  # one copy per cache
        if cached is None:
            data = load_head_scores(self.heads)
            if "semantic" not in data or "prefix_curves" not in data:
                raise KVSqueezeError("this calibration predates CompressKV; rerun `kvsqueeze calibrate heads`")
            semantic = torch.tensor(data["semantic"], dtype=torch.float32)
            curves = torch.tensor(data["prefix_curves"], dtype=torch.float32)
            if semantic.shape != (ctx.num_layers, ctx.keys.shape[1]):
                raise KVSqueezeError(
                    f"head calibration is for {tuple(semantic.shape)} (layers, KV heads) but the model has "
                    f"({ctx.num_layers}, {ctx.keys.shape[1]}); calibrate this model"
                )
            cached = ctx.shared["compresskv_calibration"] = (semantic, curves)
        return cached

    def score(self, ctx: LayerContext) -> torch.Tensor:
        semantic, _ = self._calibration(ctx)
        H = ctx.keys.shape[1]
        chosen = torch.topk(semantic[ctx.layer_idx], min(self.srh, H)).indices.to(ctx.keys.device)
        votes = ctx.per_kv_head(ctx.window_attention(self.window).sum(2))  # [B, H, L]
        votes = votes[:, chosen].sum(1, keepdim=True).expand(-1, H, -1)  # the SRHs decide for every head
        votes = pool_scores(votes.contiguous(), self.kernel, "avg")
        in_window = torch.zeros_like(ctx.valid)
        in_window[:, -min(self.window, ctx.length) :] = True
        return votes.masked_fill(in_window[:, None, :], PROTECTED)

    def counts(self, scores: torch.Tensor, keep_per_head: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        _, curves = self._calibration(ctx)
        B, H, _ = scores.shape
        n_real = ctx.valid.sum(-1).tolist()
        out = torch.empty(B, H, dtype=torch.long, device=scores.device)
        memo = ctx.scratch.setdefault("compresskv", {})
        for b in range(B):
            k, n = int(keep_per_head[b]), int(n_real[b])
            p = min(self.window, n, k)
            key = (k, n, p)
            if key not in memo:
                f = (k - p) / max(n - p, 1)  # target retention of the non-window tokens
                lost = 1 - torch.stack([interpolate(torch.tensor([f * (curves.shape[1] - 1)]), c)[0] for c in curves])
                memo[key] = error_budgets(lost, k, min(p + 1, k), n)
            out[b] = memo[key][ctx.layer_idx]
        return out
