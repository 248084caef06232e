"""EMS — "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on Global-Local
Importance" (Li et al., arXiv 2412.08521).

Global-Local score (per query head, then averaged over each KV group): accumulated attention is biased towards
early tokens by the causal mask (token ``j`` is seen by ``L - j`` queries), so the *global* part is the attention
a token receives averaged over the queries that can see it; the *local* part is the mean attention of the last
``window`` queries (the observation window)::

    S_GL[j] = (sum_{i >= j} A[i, j]) / |{i >= j}|  +  (1/w) sum_{i in window} A[i, j]

Evict-then-merge, per KV head: the ``budget`` highest-scoring tokens are kept (the recent window is always
kept); every evicted token is matched to its most similar kept token (cosine similarity of keys — the *class
centers*). Redundant tokens (similarity ``>= threshold``) are merged into their center; the others fall in the
*zero class* and are evicted (sparsity). Heads therefore differ: a head whose keys are redundant merges much,
a sparse head mostly evicts. The zero class is also how it is computed: every evicted token scatters into
``C + 1`` slots and slot ``C`` is discarded. Merge rule: GL-score-weighted mean of keys and of values::

    k_c' = (s_c k_c + sum_e s_e k_e) / (s_c + sum_e s_e)          (same weights for v)

Deviations: the paper's exact merge weighting and its score kernel were not available to us — the weighting
above is our reading (attention-weighted merging); the recent window tokens are never centers (they stay exact);
``threshold`` is a fixed parameter; GQA: scores averaged over each KV group, merging per KV head; one-shot at
prefill unless composed with a decoding schedule. The kept count is the budget: merging adds no tokens.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import PROTECTED, Scorer
from kvsqueeze.policies.h2o import accumulated_attention
from kvsqueeze.spec import register


def global_local(attention: torch.Tensor, window: int) -> torch.Tensor:
    """Global-Local score ``[..., L]`` from a full causal attention matrix ``[..., L, L]`` (rows = queries)."""
    L = attention.shape[-1]
    seen_by = torch.arange(L, 0, -1, dtype=attention.dtype, device=attention.device)  # token j: L - j queries
    w = min(window, attention.shape[-2])
    return attention.sum(-2) / seen_by + attention[..., -w:, :].mean(-2)


def evict_then_merge(
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    scores: torch.Tensor,
    threshold: float,
    centers: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One head ``[L, D]``: merge evicted tokens into their most similar center (zero class when below
    ``threshold``). ``centers`` (default ``keep``) are the kept tokens that may absorb others. Returns the new
    keys, values and the class of every token (center index into ``L``, ``-1`` = zero class / not evicted)."""
    L = keys.shape[0]
    centers = keep if centers is None else centers
    c_idx, e_idx = centers.nonzero().flatten(), (~keep).nonzero().flatten()
    cls = torch.full((L,), -1, dtype=torch.long, device=keys.device)
    if c_idx.numel() == 0 or e_idx.numel() == 0:
        return keys, values, cls
    kn = torch.nn.functional.normalize(keys.float(), dim=-1)
    sim = kn[e_idx] @ kn[c_idx].T  # [E, C]
    best, arg = sim.max(-1)
    C = c_idx.numel()
    slot = torch.where(best >= threshold, arg, torch.full_like(arg, C))  # C = the zero class
    w = scores[e_idx].float().clamp_min(0)
    num_k = torch.zeros(C + 1, keys.shape[-1], device=keys.device).index_add_(0, slot, w[:, None] * keys[e_idx].float())
    num_v = torch.zeros(C + 1, values.shape[-1], device=keys.device).index_add_(
        0, slot, w[:, None] * values[e_idx].float()
    )
    den = torch.zeros(C + 1, device=keys.device).index_add_(0, slot, w)[:C]
    wc = scores[c_idx].float().clamp_min(0)
    total = (wc + den).clamp_min(torch.finfo(torch.float32).tiny)
    new_k, new_v = keys.clone(), values.clone()
    merged = den > 0
    ck = (wc[:, None] * keys[c_idx].float() + num_k[:C]) / total[:, None]
    cv = (wc[:, None] * values[c_idx].float() + num_v[:C]) / total[:, None]
    new_k[c_idx[merged]] = ck[merged].to(keys.dtype)
    new_v[c_idx[merged]] = cv[merged].to(values.dtype)
    cls[e_idx[slot < C]] = c_idx[slot[slot < C]]
    return new_k, new_v, cls


@register
class EMS(Scorer):
    name = "ems"
    family = "merging"
    paper = (
        "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on Global-Local Importance"
    )
    arxiv = "2412.08521"
    window: int = Field(32, ge=1)
    threshold: float = Field(0.5, ge=-1.0, le=1.0)

    def protected(self, length: int) -> int:
        return min(self.window, length)

    def global_local(self, ctx: LayerContext) -> torch.Tensor:
        """``[B, H, L]`` Global-Local score (unprotected), chunked: never forms the ``L x L`` matrix."""
        acc = accumulated_attention(ctx)  # [B, Hq, L]: column sums over real queries
        seen_by = ctx.valid.long().flip(-1).cumsum(-1).flip(-1).clamp_min(1)  # real queries at or after j
        local = ctx.window_attention(self.window).mean(2)  # [B, Hq, L]
        score = acc / seen_by[:, None, :].float() + local
        return ctx.per_kv_head(score.masked_fill(~ctx.valid[:, None, :], 0.0))

    def _window(self, ctx: LayerContext) -> torch.Tensor:
        in_window = torch.zeros_like(ctx.valid)
        in_window[:, -min(self.window, ctx.length) :] = True
        return in_window

    def score(self, ctx: LayerContext) -> torch.Tensor:
        score = self.global_local(ctx)
        ctx.state["ems_gl"] = score
        return score.masked_fill(self._window(ctx)[:, None, :], PROTECTED)

    def merge(self, ctx: LayerContext, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        scores = ctx.state.pop("ems_gl", None)
        if scores is None or scores.shape != keep.shape:
            scores = self.global_local(ctx)
        window = self._window(ctx)
        keys, values = ctx.keys.clone(), ctx.values.clone()
        B, H, _ = keep.shape
        for b in range(B):
            real = ctx.valid[b]
            for h in range(H):
                kept = keep[b, h][real]
                centers = kept & ~window[b][real]
                mk, mv, _ = evict_then_merge(
                    ctx.keys[b, h][real], ctx.values[b, h][real], kept, scores[b, h][real], self.threshold, centers
                )
                keys[b, h][real], values[b, h][real] = mk, mv
        return keys, values
