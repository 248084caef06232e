"""MiniCache — "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models"
(Liu et al., arXiv 2405.14366).

Adjacent layers in the deep half of an LLM hold similar KV states. From layer ``S = floor(start · layers)`` on,
layers are paired ``(S, S+1), (S+2, S+3), …``; for every token both layers keep, the pair stores

- one shared *direction*: SLERP of the two unit directions,
  ``e = sin((1-t)Ω)/sin Ω · x_a/||x_a|| + sin(tΩ)/sin Ω · x_b/||x_b||`` with ``Ω`` the angle between them
  (``a`` = layer ``l-1``, ``b`` = layer ``l``), held ONCE for the two layers;
- each layer's own *magnitude* ``||x_a||``, ``||x_b||``;
- *retained* tokens unmerged: per (row, KV head) the angular distance ``d = arccos(cos(x_a, x_b)) / π`` of every
  pair is computed and the pairs with ``d > d_max - γ (d_max - d_min)`` (the most distinct ones) are stored exactly
  in both layers.

A layer restores its states as ``||x|| · e`` (retained tokens exact) when it attends. Keys and values are merged
separately (each has its own directions, magnitudes and retained set). Keys are merged after RoPE: both layers
rotate a token by the same angle, an isometry, so angles, magnitudes and SLERP are unchanged by it.

How it is wired: ``minicache`` is a codec. Compression runs layer by layer in the prefill pass; the first layer of a
pair stores its kept tokens exactly and leaves its block in the cache-wide ``ctx.shared`` registry; when the second
layer is encoded, the pair is merged, the first layer's block is turned (once, in place, before anything attends
to it) into its view of the shared storage, and the second layer's block is the other view. The shared directions
are one storage reachable from both layers; ``cache.nbytes()`` counts distinct storages, so they count once.

Composition: with an eviction scorer (``snapkv+minicache``) the two layers may keep different tokens; tokens kept
by both are merge candidates, tokens kept by one layer only are stored exactly in that layer.

Decisions and deviations:
- tokens appended during decoding stay per layer at full precision (the paper also merges during decoding);
- retention threshold: the paper thresholds each pair's angular distance at a ``γ`` fraction of its min–max
  range and keeps the highly distinct pairs unmerged, more of them for larger ``γ``; we anchor the threshold at
  ``d_max`` (``d > d_max - γ (d_max - d_min)``) so that it selects exactly those pairs; ranges are per
  (row, KV head), keys and values separately;
- defaults ``t=0.6`` and ``γ=0.05`` (the paper's settings as we read them), ``start=0.5`` (merging from the middle
  layer); an odd number of deep layers leaves the last one unpaired (stored exactly);
- magnitudes are stored at the model dtype; which tokens of a layer come from the shared directions is a
  1-byte-per-token mask per layer (counted in ``nbytes``);
- no quantization of the merged states (the paper's 4-bit variant composes MiniCache with KIVI);
- only the prefill schedule: decoding schedules recompress layers one by one, which would break the pairing;
- models whose paired layers are not both full attention (Gemma-3's sliding-window layers) are refused.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from kvsqueeze.codecs.base import Codec
from kvsqueeze.core.storage import DenseBlock, KVBlock
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import register

_REGISTRY_KEY = "minicache"


# ---- the merge math -------------------------------------------------------------------------------------------
def slerp(e_a: torch.Tensor, e_b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation of unit vectors ``[N, D]`` (linear where they are parallel), renormalised."""
    cos = (e_a * e_b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    small = sin.abs() < eps
    wa = torch.where(small, torch.full_like(sin, 1 - t), torch.sin((1 - t) * omega) / sin.clamp(min=eps))
    wb = torch.where(small, torch.full_like(sin, t), torch.sin(t * omega) / sin.clamp(min=eps))
    out = wa * e_a + wb * e_b
    return out / out.norm(dim=-1, keepdim=True).clamp(min=eps)


def angular_distance(x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
    """The paper's ``d = arccos(cos(x_a, x_b)) / π`` per row of ``[N, D]``: 0 (same direction) … 1 (opposite)."""
    cos = torch.nn.functional.cosine_similarity(x_a.float(), x_b.float(), dim=-1, eps=1e-12)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def retained_pairs(dist: torch.Tensor, groups: torch.Tensor, gamma: float) -> torch.Tensor:
    """Pairs kept unmerged ``[N]`` bool: ``d > d_max - γ (d_max - d_min)`` with min/max per group (row, KV head)."""
    if dist.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=dist.device)
    n = int(groups.max()) + 1
    lo = torch.full((n,), math.inf, device=dist.device).scatter_reduce(0, groups, dist, "amin")
    hi = torch.full((n,), -math.inf, device=dist.device).scatter_reduce(0, groups, dist, "amax")
    threshold = hi - gamma * (hi - lo)
    return dist > threshold[groups]


def merge_states(x_a: torch.Tensor, x_b: torch.Tensor, t: float, gamma: float, groups: torch.Tensor | None = None):
    """Merge two layers' states ``[N, D]`` of the same tokens.

    Returns ``(retained [N] bool, direction [M, D], norm_a [M], norm_b [M])`` where ``M`` counts the merged
    (not retained) pairs, in order; directions/norms in float32."""
    groups = torch.zeros(x_a.shape[0], dtype=torch.long, device=x_a.device) if groups is None else groups
    retained = retained_pairs(angular_distance(x_a, x_b), groups, gamma)
    a, b = x_a[~retained].float(), x_b[~retained].float()
    norm_a, norm_b = a.norm(dim=-1), b.norm(dim=-1)
    direction = slerp(a / norm_a[:, None].clamp(min=1e-12), b / norm_b[:, None].clamp(min=1e-12), t)
    return retained, direction, norm_a, norm_b


# ---- storage ------------------------------------------------------------------------------------------------
class _States:
    """One layer's keys (or values): ``merged [N]`` bool (restored from the shared direction), ``norms [M]``,
    ``exact [N - M, D]``; ``direction [M, D]`` is the pair's shared tensor (counted where ``owner``)."""

    def __init__(self, exact: torch.Tensor, merged=None, norms=None, direction=None, owner: bool = False):
        self.exact, self.merged, self.norms, self.direction, self.owner = exact, merged, norms, direction, owner

    def restore(self, dtype: torch.dtype) -> torch.Tensor:
        if self.merged is None:
            return self.exact.to(dtype)
        out = torch.empty(self.merged.shape[0], self.exact.shape[-1], dtype=dtype, device=self.exact.device)
        out[self.merged] = (self.norms.float()[:, None] * self.direction.float()).to(dtype)
        out[~self.merged] = self.exact.to(dtype)
        return out


class MiniCacheBlock(KVBlock):
    """A layer's kept tokens: exact, or (once paired) its view of the pair's shared directions."""

    def __init__(self, keys: _States, values: _States, lengths: torch.Tensor):
        self.keys, self.values, self.lengths = keys, values, lengths.cpu()

    @property
    def paired(self) -> bool:
        return self.keys.merged is not None

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys.restore(dtype), self.values.restore(dtype)


def _merge_kind(x_a, x_b, cand_a, cand_b, groups, t, gamma, dtype) -> tuple[_States, _States]:
    """Merge the candidate rows of two layers' flat states; the rest of each layer stays exact."""
    retained, direction, norm_a, norm_b = merge_states(x_a[cand_a], x_b[cand_b], t, gamma, groups)
    direction = direction.to(dtype).contiguous()
    merged_a, merged_b = cand_a.clone(), cand_b.clone()
    merged_a[cand_a] = ~retained
    merged_b[cand_b] = ~retained
    side_a = _States(x_a[~merged_a].contiguous(), merged_a, norm_a.to(dtype), direction, owner=False)
    side_b = _States(x_b[~merged_b].contiguous(), merged_b, norm_b.to(dtype), direction, owner=True)
    return side_a, side_b


def _cat_dense(old: DenseBlock, new: DenseBlock) -> DenseBlock:
    """Append ``new``'s tokens after ``old``'s, per (row, head)."""
    B, H = old.lengths.shape
    D = old.keys.shape[-1]
    if old.uniform and new.uniform:
        lo, ln = int(old.lengths[0, 0]), int(new.lengths[0, 0])
        keys = torch.cat([old.keys.view(B, H, lo, D), new.keys.view(B, H, ln, D)], dim=2).reshape(-1, D)
        values = torch.cat([old.values.view(B, H, lo, -1), new.values.view(B, H, ln, -1)], dim=2)
        return DenseBlock(keys, values.reshape(keys.shape[0], -1), old.lengths + new.lengths)
    parts_k, parts_v = [], []
    for ok, ov, nk, nv in zip(
        old.keys.split(old.lengths.flatten().tolist()), old.values.split(old.lengths.flatten().tolist()),
        new.keys.split(new.lengths.flatten().tolist()), new.values.split(new.lengths.flatten().tolist()),
        strict=True,
    ):  # fmt: skip
        parts_k += [ok, nk]
        parts_v += [ov, nv]
    return DenseBlock(torch.cat(parts_k), torch.cat(parts_v), old.lengths + new.lengths)


@register
class MiniCache(Codec):
    name = "minicache"
    family = "merging"
    paper = "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models"
    arxiv = "2405.14366"
    t: float = Field(0.6, gt=0.0, lt=1.0)
    gamma: float = Field(0.05, ge=0.0, le=1.0)
    start: float = Field(0.5, ge=0.0, lt=1.0)

    def role(self, layer_idx: int, num_layers: int) -> str | None:
        """``"a"`` (first of a pair), ``"b"`` (second) or None (shallow layer, stored as it is)."""
        first = math.floor(self.start * num_layers)
        if layer_idx < first:
            return None
        return "a" if (layer_idx - first) % 2 == 0 else "b"

    def encode(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, ctx=None) -> KVBlock:
        if ctx is None:  # tokens appended while decoding stay per layer, at full precision
            return DenseBlock(keys.contiguous(), values.contiguous(), lengths)
        if "pos" in ctx.state:
            raise KVSqueezeError("minicache merges layer pairs at prefill only; use it with the prefill schedule")
        if ctx.sliding_window is not None and self.role(ctx.layer_idx, ctx.num_layers) is not None:
            raise KVSqueezeError(
                f"minicache pairs adjacent full-attention layers, but layer {ctx.layer_idx} is a sliding-window "
                "layer; use another codec for this model"
            )
        role = self.role(ctx.layer_idx, ctx.num_layers)
        if role is None:
            return DenseBlock(keys.contiguous(), values.contiguous(), lengths)
        registry = ctx.shared.setdefault(_REGISTRY_KEY, {})
        if role == "a":
            block = MiniCacheBlock(_States(keys.contiguous()), _States(values.contiguous()), lengths)
            registry[ctx.layer_idx] = (block, ctx.stored)
            return block
        pending = registry.pop(ctx.layer_idx - 1, None)
        if pending is None:
            raise KVSqueezeError(
                f"minicache pairs adjacent full-attention layers, but layer {ctx.layer_idx - 1} is not one "
                "(sliding-window layers); use another codec for this model"
            )
        block_a, stored_a = pending
        stored_b = ctx.stored
        if stored_a is None or stored_b is None or stored_a.shape != stored_b.shape:
            raise KVSqueezeError("minicache: the two layers of a pair must be compressed over the same tokens")
        both = stored_a & stored_b
        cand_a, cand_b = both[stored_a], both[stored_b]  # merge candidates, in each layer's flat order
        B, H, L = both.shape
        groups = torch.arange(B * H, device=both.device).repeat_interleave(L)[both.flatten()]
        ka, kb = block_a.keys.exact, keys
        va, vb = block_a.values.exact, values
        keys_a, keys_b = _merge_kind(ka, kb, cand_a, cand_b, groups, self.t, self.gamma, keys.dtype)
        values_a, values_b = _merge_kind(va, vb, cand_a, cand_b, groups, self.t, self.gamma, values.dtype)
        block_a.keys, block_a.values = keys_a, values_a  # once, before the layer's first attention over it
        return MiniCacheBlock(keys_b, values_b, lengths)

    def extend(self, block: KVBlock, newer: KVBlock) -> KVBlock | None:
        if type(block) is DenseBlock and type(newer) is DenseBlock:
            return _cat_dense(block, newer)
        return None
