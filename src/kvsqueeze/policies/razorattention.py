"""RazorAttention — "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads"
(Tang et al., arXiv 2407.15891).

Retrieval heads (echo + induction heads, found offline on repeated random tokens: ``calibration/heads.py``,
``kvsqueeze calibrate heads``) keep their whole cache. Every other head keeps the attention sinks, a window of
recent tokens and one *compensation token* whose key and value are the means of the keys and values it
dropped. The paper protects the top ~14% induction heads and ~1% echo heads (``induction=0.14, echo=0.01``).

Mapping onto kvsqueeze's budget (Σ over layers and heads = ``layers × H × keep``, exact): the retrieval heads
are known before the forward from the calibration, so every layer computes the same global plan — retrieval
heads hold all their ``n`` real tokens, and the rest of the global budget is spread evenly over the other
heads (remainder by (layer, head) order), each keeping ``sinks`` + recent + 1 compensation token. Counts
per layer therefore differ, the total does not. The scorer fixes the counts itself (``Scorer.counts``).
Deviations: (1) the paper's recent window is a fixed rule (``max(4000, N/5)`` tokens); here it is whatever
the budget leaves. (2) When the budget cannot pay for all chosen retrieval heads plus a minimal window
elsewhere, the lowest-scored retrieval heads are demoted. (3) The paper weights the compensation token by
the number of tokens it replaces inside attention; kvsqueeze's attention treats it as one token (a
count-dependent logit bias cannot be stored in a key), so it acts as an unweighted summary. (4) The
compensation token occupies the slot of the oldest token of the recent window (its original position is
never used again: keys are stored post-RoPE), so the window proper is ``count − sinks − 1`` tokens.
(5) GQA: a KV head is a retrieval head when any of its query heads is one. Means are over post-RoPE keys.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvsqueeze.calibration.heads import load_head_scores, retrieval_heads
from kvsqueeze.core.context import LayerContext
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policies.base import PROTECTED, Scorer
from kvsqueeze.spec import register


def razor_plan(
    retrieval: torch.Tensor, rank: torch.Tensor, keep: int, n: int, sinks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head counts ``[layers, H]`` (sum = ``layers × H × keep``) and the retrieval mask actually used."""
    layers, H = retrieval.shape
    total = layers * H * keep
    floor_count = min(n, sinks + 2)  # sinks, >= 1 recent token, the compensation token
    if keep >= n:
        return torch.full((layers, H), n, dtype=torch.long), retrieval.clone()
    if total < layers * H * floor_count:
        raise KVSqueezeError(
            f"razorattention needs at least {floor_count} tokens per head (sinks + recent + compensation) but the "
            f"budget is {keep}; use a smaller ratio or fewer sinks"
        )
    retrieval = retrieval.clone()
    chosen = sorted(retrieval.flatten().nonzero().flatten().tolist(), key=lambda i: -float(rank.view(-1)[i]))
    while chosen:
        others = layers * H - len(chosen)
        if others == 0 or total - len(chosen) * n >= others * floor_count:
            break
        retrieval.view(-1)[chosen.pop()] = False  # demote the weakest retrieval head
    counts = torch.full((layers, H), n, dtype=torch.long)
    others = (~retrieval).flatten().nonzero().flatten()
    if others.numel():
        rest = total - (layers * H - others.numel()) * n
        base, extra = divmod(rest, others.numel())
        share = torch.full((others.numel(),), base, dtype=torch.long)
        share[:extra] += 1
        counts.view(-1)[others] = share.clamp(max=n)
    return counts, retrieval


@register
class RazorAttention(Scorer):
    name = "razorattention"
    family = "heads"
    paper = "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads"
    arxiv = "2407.15891"
    heads: str = ""  # calibration JSON path or model name ('' = the embedded model's cached calibration)
    induction: float = Field(0.14, ge=0.0, le=1.0)
    echo: float = Field(0.01, ge=0.0, le=1.0)
    sinks: int = Field(4, ge=0)

    def protected(self, length: int) -> int:
        return min(self.sinks, length)

    def _heads(self, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        cached = ctx.shared.get("razor_heads")  # one copy per cache
        if cached is None:
            data = load_head_scores(self.heads)
            mask, rank = retrieval_heads(data, self.induction, self.echo)
            if mask.shape != (ctx.num_layers, ctx.keys.shape[1]):
                raise KVSqueezeError(
                    f"head calibration {self.heads or 'embedded'!r} is for {tuple(mask.shape)} (layers, KV heads) "
                    f"but the model has ({ctx.num_layers}, {ctx.keys.shape[1]}); calibrate this model"
                )
            cached = ctx.shared["razor_heads"] = (mask, rank)
        return cached

    def _plan(self, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts ``[B, H]`` and retrieval mask ``[B, H]`` of this layer."""
        mask, rank = self._heads(ctx)
        n_real = ctx.valid.sum(-1).tolist()
        keep = ctx.keep.tolist() if ctx.keep is not None else n_real
        plans = [razor_plan(mask, rank, int(k), int(n), self.sinks) for k, n in zip(keep, n_real, strict=True)]
        counts = torch.stack([c[ctx.layer_idx] for c, _ in plans]).to(ctx.keys.device)
        retrieval = torch.stack([r[ctx.layer_idx] for _, r in plans]).to(ctx.keys.device)
        return counts, retrieval

    def score(self, ctx: LayerContext) -> torch.Tensor:
        _, retrieval = self._plan(ctx)
        rank = ctx.valid.long().cumsum(-1) - 1  # position among real tokens: recency
        score = rank.float().masked_fill(rank < self.sinks, PROTECTED)[:, None, :].expand(-1, retrieval.shape[1], -1)
        return score.masked_fill(retrieval[:, :, None], PROTECTED).clone()

    def counts(self, scores: torch.Tensor, keep_per_head: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        return self._plan(ctx)[0]

    def merge(self, ctx: LayerContext, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        valid = ctx.valid[:, None, :]
        dropped = valid & ~keep  # [B, H, L]
        if not bool(dropped.any()):
            return None
        rank = ctx.valid.long().cumsum(-1) - 1
        window = keep & (rank >= self.sinks)[:, None, :]
        # the compensation slot: oldest kept non-sink token of every head that dropped something
        slot_idx = window.float().argmax(-1)  # first True
        has_slot = window.any(-1) & dropped.any(-1)
        slot = torch.zeros_like(keep)
        slot.scatter_(-1, slot_idx[..., None], has_slot[..., None])
        folded = (dropped | slot).to(ctx.keys.dtype)[..., None]  # [B, H, L, 1]
        n = folded.sum(2, keepdim=True).clamp(min=1)
        k_mean = (ctx.keys * folded).sum(2, keepdim=True) / n
        v_mean = (ctx.values * folded).sum(2, keepdim=True) / n
        put = slot[..., None]
        return torch.where(put, k_mean, ctx.keys), torch.where(put, v_mean, ctx.values)
