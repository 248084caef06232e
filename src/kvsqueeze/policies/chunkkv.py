"""ChunkKV — "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference"
(Liu et al., arXiv 2502.00299).

Tokens are grouped into fixed-size chunks of consecutive tokens (``chunk = 10`` in the paper); a chunk's score
is the sum of its tokens' observation-window attention (SnapKV's votes of the last ``window`` queries); the
highest-scoring chunks are kept *whole*, so phrases survive together, plus the observation window.
Layer-wise index reuse (the paper's ``N_reuse``): layer ``l`` reuses the selection of layer ``l − l mod reuse``.

Mapping and deviations: chunk scores are summed over the KV heads of the layer so every head keeps the same
chunks (``shared_heads``; the paper selects one index set per layer, which is what makes index reuse
possible); when the budget is not a multiple of the chunk size, the last selected chunk is kept partially
(its best tokens), so the budget is met exactly; chunks are counted from the first real token of a row
(padding never forms chunks); index reuse carries scores between layers through cache-wide state and is
off by default (``reuse = 1``).
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import PROTECTED, Scorer
from kvsqueeze.spec import register


def chunk_scores(token_scores: torch.Tensor, valid: torch.Tensor, chunk: int) -> torch.Tensor:
    """Structured scores ``[B, H, L]``: every token carries its chunk's rank (whole chunks first, best chunk
    highest) plus a within-chunk tie-break (< 1) from its own score."""
    B, H, L = token_scores.shape
    start = valid.float().argmax(-1)  # left padding: chunks start at the first real token
    pos = torch.arange(L, device=valid.device)[None, :] - start[:, None]
    chunk_id = torch.where(valid, pos.clamp(min=0) // chunk, 0)  # [B, L]
    n_chunks = int(chunk_id.max()) + 1
    idx = chunk_id[:, None, :].expand(B, H, L)
    finite = token_scores.masked_fill(~torch.isfinite(token_scores), 0.0) * valid[:, None, :]
    totals = torch.zeros(B, H, n_chunks, dtype=torch.float32, device=valid.device).scatter_add_(-1, idx, finite)
    rank = totals.argsort(-1).argsort(-1).float()  # 0 = worst chunk
    per_token = rank.gather(-1, idx)
    own = finite / finite.amax(-1, keepdim=True).clamp(min=1e-30)  # in [0, 1]
    return per_token + 0.5 * own


@register
class ChunkKV(Scorer):
    name = "chunkkv"
    family = "structured"
    paper = "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference"
    arxiv = "2502.00299"
    chunk: int = Field(10, ge=1)
    window: int = Field(32, ge=1)
    shared_heads: bool = True
    reuse: int = Field(1, ge=1)

    def protected(self, length: int) -> int:
        return min(self.window, length)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        shared = ctx.scratch.setdefault("chunkkv", {})
        anchor = ctx.layer_idx - ctx.layer_idx % self.reuse
        if self.reuse > 1 and ctx.layer_idx != anchor and shared.get("anchor") == anchor:
            return shared["scores"]
        L = ctx.length
        w = min(self.window, L)
        votes = ctx.per_kv_head(ctx.window_attention(self.window).sum(2))  # [B, H, L]
        body = ctx.valid.clone()
        body[:, L - w :] = False  # the window is kept anyway; chunks cover the rest
        if self.shared_heads:
            votes = votes.sum(1, keepdim=True).expand_as(votes)
        scores = chunk_scores(votes, body, self.chunk).masked_fill(~body[:, None, :], float("-inf"))
        scores[..., L - w :] = PROTECTED
        if self.reuse > 1:
            shared["anchor"], shared["scores"] = anchor, scores
        return scores
