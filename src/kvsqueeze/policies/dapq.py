"""DapQ — "Where Matters More Than What: Decoding-aligned KV Cache Compression via Position-aware Pseudo Queries"
(Tian et al., arXiv 2603.11564).

Observation-window scorers (SnapKV) judge the context with the queries of the prompt's last tokens, but what
matters is what the *decoding* queries — which come after the context — will attend to. DapQ's finding is that a
query's *position* shapes its attention more than its content, so it builds pseudo queries placed at the positions
the future tokens will occupy and uses them as the observation window: their attention over the context, summed
over the pseudo queries and smoothed SnapKV-style (1-D pooling), picks the kept tokens; the real last ``window``
tokens are kept as well.

Construction here: the pseudo queries carry the content of the last ``window`` real queries, re-rotated by RoPE to
the positions right after the context (``offset`` leaves a gap, e.g. for a question of known length): the query of
position ``p`` moves to ``p + window + offset``. RoPE composes rotations, so re-rotating the post-RoPE query by the
position shift gives exactly the query that content would have at the future position.

Deviations: (1) the pseudo queries' content is the real window queries' content (the paper's point is that
content matters less than position; its exact content recipe was not available here). (2) GQA: votes averaged
over the query heads of each KV head. (3) Needs standard RoPE (``default`` or ``linear`` scaling, half-split
pairing as in Llama/Qwen2/Mistral/Gemma-3); the RoPE settings come from the model config the cache was built with.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvsqueeze.core.context import LayerContext
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policies.base import PROTECTED, Scorer
from kvsqueeze.policies.snapkv import pool_scores
from kvsqueeze.spec import register


def rope_frequencies(config, head_dim: int) -> torch.Tensor:
    """Inverse RoPE frequencies ``[D/2]`` (float64) of a full-attention layer of ``config``."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params = params.get("full_attention", params)
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    kind = params.get("rope_type", "default")
    if theta is None or kind not in ("default", "linear"):
        raise KVSqueezeError(f"dapq needs standard RoPE (rope_type default or linear), got {kind!r}; use snapkv")
    inv = 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return inv / float(params.get("factor", 1.0)) if kind == "linear" else inv


def shift_rope(x: torch.Tensor, shift: int | float, inv_freq: torch.Tensor) -> torch.Tensor:
    """Post-RoPE vectors ``x [..., D]`` moved ``shift`` positions forward (half-split RoPE pairing)."""
    half = x.shape[-1] // 2
    angle = float(shift) * inv_freq.to(x.device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    a, b = x[..., :half].double(), x[..., half:].double()
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)


def pseudo_query_attention(ctx: LayerContext, pseudo: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``[B, Hq, P, L]`` of pseudo queries (positioned after every key) over the valid keys."""
    keys = ctx.keys.repeat_interleave(ctx.groups, dim=1)
    logits = torch.matmul(pseudo, keys.transpose(-1, -2)).float() * ctx.scaling
    logits = logits.masked_fill(~ctx.valid[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


@register
class DapQ(Scorer):
    name = "dapq"
    family = "eviction"
    paper = "Where Matters More Than What: Decoding-aligned KV Cache Compression via Position-aware Pseudo Queries"
    arxiv = "2603.11564"
    window: int = Field(32, ge=1)
    offset: int = Field(0, ge=0)
    kernel: int = Field(5, ge=1)
    pool: Literal["avg", "max"] = "avg"

    def protected(self, length: int) -> int:
        return min(self.window, length)

    def pseudo_queries(self, ctx: LayerContext) -> torch.Tensor:
        """``[B, Hq, w, D]``: the last ``window`` queries moved to the positions after the context."""
        q = ctx.require_queries("dapq", 1)
        w = min(self.window, q.shape[2], ctx.length)
        config = ctx.shared.get("config")
        if config is None:
            raise KVSqueezeError("dapq needs the model's RoPE settings: use it through CompressedCache(model, 'dapq')")
        inv_freq = ctx.shared.get("dapq_inv_freq")  # one copy per cache
        if inv_freq is None:
            inv_freq = ctx.shared["dapq_inv_freq"] = rope_frequencies(config, q.shape[-1])
        return shift_rope(q[:, :, -w:], w + self.offset, inv_freq)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        probs = pseudo_query_attention(ctx, self.pseudo_queries(ctx))
        votes = pool_scores(ctx.per_kv_head(probs.sum(2)), self.kernel, self.pool)
        in_window = torch.zeros_like(ctx.valid)
        in_window[:, -min(self.window, ctx.length) :] = True
        return votes.masked_fill(in_window[:, None, :], PROTECTED).masked_fill(~ctx.valid[:, None, :], float("-inf"))
