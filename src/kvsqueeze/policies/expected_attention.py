"""Expected Attention — "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
Distribution" (Devoto, Jeblick, Jégou; arXiv 2510.00636).

A key matters as much as the attention that *future* queries will give it. Queries are modelled as Gaussian:
the pre-RoPE queries of a head have mean ``mu`` and covariance ``Sigma`` (estimated from the queries the layer
has seen). A future query at position ``t`` is ``R_t q`` (RoPE is linear), so the paper replaces the unknown
position by the average rotation over the next ``future`` positions, ``R = mean_i R_{now+i}``, and uses the
Gaussian ``N(R mu, R Sigma R^T)``. For a Gaussian ``q``, ``E[exp(s q.k)] = exp(s mu'.k + s^2 k^T Sigma' k / 2)``
(the moment generating function), ``s`` the attention scaling (``1/sqrt(d)``). Normalised over the keys this is
the expected attention of each key; the paper weights it by the value norm (a key's contribution to the residual
stream is attention × value) and always keeps the first ``sinks`` tokens.

Here the statistics come from ``LayerContext.queries`` (post-RoPE, at their own positions), rotated back to
pre-RoPE coordinates with the model's RoPE settings, so query norms (Gemma-3), biases (Qwen2) and the model's
own scaling are included exactly.

Deviations:
- the paper (and kvpress) estimates the statistics from the layer's *hidden states* projected by ``W_Q``; here
  the pre-RoPE queries themselves are used (identical for a bias-free, norm-free projection; exact otherwise);
- ``window`` > 0 restricts the statistics to the last ``window`` queries (0 = every query the layer sees, first
  ``sinks`` tokens excluded, as in the paper's prefill);
- GQA: expected attention averaged over the query heads of each KV group (as kvpress does);
- the softmax normalisation runs over the non-sink real tokens (sinks are kept regardless);
- needs standard RoPE (``default`` or ``linear`` scaling, half-split pairing), like ``dapq``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvsqueeze.core.context import LayerContext
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policies.base import PROTECTED, Scorer, prefill_memo
from kvsqueeze.policies.dapq import rope_frequencies
from kvsqueeze.spec import register


def pair_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply ``[[cos, -sin], [sin, cos]]`` (``[..., D/2]`` each) to the half-split RoPE pairs of ``x [..., D]``.

    With ``cos``/``sin`` of one angle this is RoPE; with the *averages* of several angles it is the averaged
    rotation matrix (no longer orthogonal)."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` ``[..., D/2]`` (float64) of RoPE at ``positions [...]``."""
    angle = positions.double()[..., None] * inv_freq.to(positions.device)
    return torch.cos(angle), torch.sin(angle)


def mean_rotation(start: torch.Tensor, future: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The averaged RoPE rotation over positions ``start + 0 … start + future - 1``: ``cos``, ``sin`` ``[B, D/2]``."""
    steps = torch.arange(future, device=start.device)
    cos, sin = rope_angles(start[:, None] + steps, inv_freq)  # [B, future, D/2]
    return cos.mean(1), sin.mean(1)


def rotate_statistics(
    mean: torch.Tensor, cov: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(R mu, R Sigma R^T)`` for the pairwise map ``R`` given by ``cos``/``sin`` ``[B, D/2]``.

    ``mean [B, Hq, D]``, ``cov [B, Hq, D, D]``."""
    c, s = cos[:, None].to(mean.dtype), sin[:, None].to(mean.dtype)
    mean = pair_rotate(mean, c, s)
    if cov is not None:
        cov = pair_rotate(cov, c[:, :, None], s[:, :, None]).transpose(-1, -2)  # (Sigma R^T)^T = R Sigma
        cov = pair_rotate(cov, c[:, :, None], s[:, :, None]).transpose(-1, -2)  # (R Sigma R^T)^T, symmetric
    return mean, cov


def query_statistics(queries: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[B, Hq, D]`` and covariance ``[B, Hq, D, D]`` (maximum likelihood, ``/n``) of ``queries [B, Hq, N, D]``
    over the tokens where ``weights [B, N]`` is 1."""
    w = weights.to(queries.dtype)[:, None, :, None]  # [B, 1, N, 1]
    n = w.sum(2).clamp(min=1)  # [B, 1, 1]
    mean = (queries * w).sum(2) / n
    centred = (queries - mean[:, :, None]) * w
    cov = centred.transpose(-1, -2) @ centred / n[..., None]
    return mean, cov


def expected_log_exp(mean: torch.Tensor, cov: torch.Tensor | None, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """``log E[exp(scaling * q.k)]`` for ``q ~ N(mean, cov)``: ``[B, Hq, L]``.

    ``mean [B, Hq, D]``, ``cov [B, Hq, D, D]`` (None = mean only), ``keys [B, H, L, D]`` with ``Hq = H * G``."""
    B, H, L, D = keys.shape
    G = mean.shape[1] // H
    k = keys.to(mean.dtype)[:, :, None]  # [B, H, 1, L, D]
    mu = mean.view(B, H, G, 1, D)
    logits = (k * mu).sum(-1) * scaling  # [B, H, G, L]
    if cov is not None:
        quad = ((k @ cov.view(B, H, G, D, D)) * k).sum(-1)  # k^T Sigma k
        logits = logits + 0.5 * scaling**2 * quad
    return logits.reshape(B, H * G, L)


@register
class ExpectedAttention(Scorer):
    name = "expected_attention"
    family = "eviction"
    paper = "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries Distribution"
    arxiv = "2510.00636"
    future: int = Field(512, ge=1)  # future positions the RoPE rotation is averaged over
    window: int = Field(0, ge=0)  # queries used for the statistics (0 = all the layer sees)
    sinks: int = Field(4, ge=0)
    covariance: bool = True
    value_norm: bool = True
    epsilon: float = Field(0.0, ge=0.0)

    def protected(self, length: int) -> int:
        return min(self.sinks, length)

    def _inv_freq(self, ctx: LayerContext, head_dim: int) -> torch.Tensor:
        inv_freq = ctx.state.get("expected_attention_inv_freq")
        if inv_freq is None:
            config = ctx.shared.get("config")
            if config is None:
                raise KVSqueezeError(
                    "expected_attention needs the model's RoPE settings: use it through CompressedCache(model, ...)"
                )
            try:
                inv_freq = rope_frequencies(config, head_dim)
            except KVSqueezeError:
                raise KVSqueezeError(
                    "expected_attention needs standard RoPE (rope_type default or linear); use snapkv or tova"
                ) from None
            ctx.state["expected_attention_inv_freq"] = inv_freq
        return inv_freq

    def statistics(self, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pre-RoPE query statistics moved to the coming positions: ``(mean [B,Hq,D], cov [B,Hq,D,D] | None)``."""
        q = ctx.require_queries("expected_attention", 1)
        B, _, M, D = q.shape
        L = ctx.length
        inv_freq = self._inv_freq(ctx, D)
        positions = ctx.positions if ctx.positions is not None else torch.arange(L, device=q.device).expand(B, L)
        q_pos = positions[:, -M:]
        cos, sin = rope_angles(q_pos, inv_freq)  # rotate back by -position
        pre = pair_rotate(q.double(), cos[:, None], -sin[:, None])  # [B, Hq, M, D]
        use = ctx.valid[:, -M:].clone()
        rank = ctx.valid.long().cumsum(-1)[:, -M:] - 1  # index among real tokens
        use &= rank >= self.sinks
        if self.window:
            use[:, : max(M - self.window, 0)] = False
        if not bool(use.any(-1).all()):
            raise KVSqueezeError(
                f"expected_attention needs queries beyond the first {self.sinks} sink tokens; give a longer context"
            )
        mean, cov = query_statistics(pre, use)
        start = positions.max(-1).values + 1
        c, s = mean_rotation(start, self.future, inv_freq)
        return rotate_statistics(mean, cov if self.covariance else None, c, s)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        def expected() -> torch.Tensor:
            mean, cov = self.statistics(ctx)
            return expected_log_exp(mean, cov, ctx.keys, ctx.scaling)  # [B, Hq, L] float64

        key = f"expected_attention:{self.future}:{self.window}:{self.sinks}:{self.covariance}"
        logits = prefill_memo(ctx, key, expected)
        rank = ctx.valid.long().cumsum(-1) - 1
        sink = ctx.valid & (rank < self.sinks)
        scored = ctx.valid & ~sink
        probs = torch.softmax(logits.masked_fill(~scored[:, None, :], float("-inf")), dim=-1).nan_to_num(0.0)
        score = ctx.per_kv_head(probs).float()  # [B, H, L]
        if self.value_norm:
            score = (score + self.epsilon) * ctx.values.float().norm(dim=-1)
        score = score.masked_fill(sink[:, None, :], PROTECTED)
        return score.masked_fill(~ctx.valid[:, None, :], float("-inf"))
