"""TriAttention — "TriAttention: Efficient Long Reasoning with Trigonometric KV Compression"
(Mao et al., arXiv 2604.04921).

Pre-RoPE queries and keys concentrate around fixed non-zero centers. Writing each RoPE frequency pair as a
complex number (``z_f = x_f + i x_{f+D/2}``, the rotation multiplies it by ``exp(i p w_f)``), the logit of a
query at position ``p_q`` with a key at ``p_k`` is ``Re sum_f q~_f conj(k~_f) exp(i w_f (p_q - p_k))``. Replacing
the query by its pre-RoPE center ``c`` gives a *trigonometric series in the distance*::

    S_trig(k, d) = sum_f |c_f| |k~_f| cos(w_f d + arg c_f - arg k~_f)

and the part of the queries the center does not explain contributes at most the norm term
``S_norm(k) = sum_f (E|q~_f| - |c_f|) |k~_f|``. A key's importance is ``S_norm`` plus the mean of ``S_trig`` over
future query distances ``d = now + delta - p_k`` for ``delta`` in ``1, 2, 4, … , horizon``; no post-RoPE
observation window is used. Keys are re-scored and evicted to ``budget`` every ``every`` generated tokens.

Deviations (reconstructed from the paper's abstract and the RoPE algebra; the exact published weighting of
the two terms was not available offline):
- the two terms are summed with weight 1 each; the offsets are geometric (1, 2, 4, …, ``horizon``);
- query centers are running means over every query seen by the layer (prompt and generated), not
  offline calibration statistics;
- the most recent ``recent`` tokens are kept regardless; GQA: scores averaged over each KV group;
- needs standard ("default") RoPE with the half-split pairing (Llama/Qwen2/Mistral).
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvsqueeze.core.context import DecodeStep, LayerContext
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.schedules.base import DecodingSchedule, OwnRule
from kvsqueeze.spec import register


def rope_inv_freq(module, head_dim: int) -> torch.Tensor:
    """Inverse RoPE frequencies ``[D/2]`` of an attention module's config (default RoPE only)."""
    config = getattr(module, "config", None)
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None or params.get("rope_type", "default") != "default":
        raise KVSqueezeError("triattention needs a model with standard RoPE (rope_type 'default'); use interval")
    return 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def to_pre_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Complex pre-RoPE coordinates ``[..., L, D/2]`` of post-RoPE ``x [..., L, D]`` at ``positions [..., L]``."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    angle = positions.double()[..., None] * inv_freq.to(x.device)
    return z * torch.polar(torch.ones_like(angle), -angle)


def trig_scores(
    center: torch.Tensor, mean_abs: torch.Tensor, keys_pre: torch.Tensor, distances: torch.Tensor, inv_freq
) -> torch.Tensor:
    """Key importance ``[..., L]``: mean over ``distances [..., L, O]`` of ``S_trig`` plus ``S_norm``.

    ``center``/``mean_abs`` ``[..., F]`` (complex mean and mean modulus of pre-RoPE queries), ``keys_pre [..., L, F]``.
    """
    amp = center.abs()[..., None, :] * keys_pre.abs()  # [..., L, F]
    phase = (torch.angle(center)[..., None, :] - torch.angle(keys_pre))[..., None, :]  # [..., L, 1, F]
    series = (amp[..., None, :] * torch.cos(distances.double()[..., None] * inv_freq.to(amp.device) + phase)).sum(-1)
    norm = ((mean_abs - center.abs())[..., None, :] * keys_pre.abs()).sum(-1)
    return series.mean(-1) + norm


@register
class TriAttention(OwnRule, DecodingSchedule):
    name = "triattention"
    family = "schedule"
    paper = "TriAttention: Efficient Long Reasoning with Trigonometric KV Compression"
    arxiv = "2604.04921"
    horizon: int = Field(1024, ge=1)
    recent: int = Field(8, ge=0)

    def protected_recent(self) -> int:
        return self.recent

    def observe(self, state: dict, step: DecodeStep) -> None:
        q = step.queries
        if "inv_freq" not in state:
            state["inv_freq"] = rope_inv_freq(step.module, q.shape[-1])
        pre = to_pre_rope(q, step.positions[:, None, :], state["inv_freq"])  # [B, Hq, M, F]
        if step.first or "q_sum" not in state:
            state["q_sum"], state["q_abs"], state["q_n"] = 0, 0, 0
        state["q_sum"] = state["q_sum"] + pre.sum(2)
        state["q_abs"] = state["q_abs"] + pre.abs().sum(2)
        state["q_n"] = state["q_n"] + pre.shape[2]

    def score(self, ctx: LayerContext) -> torch.Tensor:
        state = ctx.state
        inv_freq = state["inv_freq"]
        center = state["q_sum"] / state["q_n"]  # [B, Hq, F]
        mean_abs = state["q_abs"] / state["q_n"]
        pos = state["pos"]  # [B, H, L]
        keys_pre = to_pre_rope(ctx.keys, pos.clamp(min=0), inv_freq)  # [B, H, L, F]
        G = center.shape[1] // keys_pre.shape[1]
        keys_pre = keys_pre.repeat_interleave(G, dim=1)
        offsets = 2 ** torch.arange(int(torch.log2(torch.tensor(float(self.horizon)))) + 1, device=pos.device)
        now = pos.max(dim=-1, keepdim=True).values  # [B, H, 1]
        distances = (now - pos)[..., None] + offsets  # [B, H, L, O]
        distances = distances.repeat_interleave(G, dim=1)
        score = trig_scores(center, mean_abs, keys_pre, distances, inv_freq)  # [B, Hq, L]
        return ctx.per_kv_head(score.float())
