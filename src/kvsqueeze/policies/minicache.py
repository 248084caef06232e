"""MiniCache — "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models"
(Liu et al., arXiv 2405.14366): the cross-layer merge math.

Two adjacent deep layers hold, per token, states ``x_a`` and ``x_b`` (keys or values of one KV head). MiniCache
stores one shared *direction* — the SLERP interpolation of the two unit directions,
``e(t) = sin((1-t) W)/sin W · e_a + sin(t W)/sin W · e_b`` with ``W`` the angle between them — plus each layer's
*magnitude* ``||x_a||``, ``||x_b||``; a layer's state is restored as ``||x|| · e(t)``. Tokens whose two directions
are too far apart (the ``retain`` fraction with the largest angle) are retained unmerged in both layers.

Status: this module implements and tests the merge/restore math only. Holding the shared direction once
across two cache layers (cross-layer shared storage inside ``CompressedCache``) is not wired in yet, so no
``minicache`` method is registered. Deviations: ``t`` is a parameter (paper: 0.5); the retention rule is
the top-``retain`` fraction of angular distance per head rather than the paper's distance threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MergedPair:
    """One shared direction per token, two magnitudes, and the retained tokens of both layers."""

    direction: torch.Tensor  # [N, D] unit vectors (retained rows unused)
    norm_a: torch.Tensor  # [N]
    norm_b: torch.Tensor  # [N]
    retained: torch.Tensor  # [R] token indices kept unmerged
    kept_a: torch.Tensor  # [R, D]
    kept_b: torch.Tensor  # [R, D]


def slerp(e_a: torch.Tensor, e_b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation of unit vectors ``[N, D]`` (linear where they are parallel)."""
    cos = (e_a * e_b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    small = sin.abs() < eps
    wa = torch.where(small, torch.full_like(sin, 1 - t), torch.sin((1 - t) * omega) / sin.clamp(min=eps))
    wb = torch.where(small, torch.full_like(sin, t), torch.sin(t * omega) / sin.clamp(min=eps))
    out = wa * e_a + wb * e_b
    return out / out.norm(dim=-1, keepdim=True).clamp(min=eps)


def merge_pair(x_a: torch.Tensor, x_b: torch.Tensor, t: float = 0.5, retain: float = 0.0) -> MergedPair:
    """Merge two layers' states ``[N, D]`` of the same tokens into one direction and two magnitudes."""
    norm_a, norm_b = x_a.norm(dim=-1), x_b.norm(dim=-1)
    e_a = x_a / norm_a[:, None].clamp(min=1e-12)
    e_b = x_b / norm_b[:, None].clamp(min=1e-12)
    angle = torch.arccos((e_a * e_b).sum(-1).clamp(-1.0, 1.0))
    n_keep = round(retain * x_a.shape[0])
    retained = torch.topk(angle, n_keep).indices.sort().values if n_keep else torch.zeros(0, dtype=torch.long)
    return MergedPair(slerp(e_a, e_b, t), norm_a, norm_b, retained, x_a[retained], x_b[retained])


def restore(pair: MergedPair, layer: str) -> torch.Tensor:
    """The state of layer ``"a"`` or ``"b"``: ``magnitude · shared direction``, retained tokens exact."""
    norm = pair.norm_a if layer == "a" else pair.norm_b
    out = norm[:, None] * pair.direction
    out[pair.retained] = pair.kept_a if layer == "a" else pair.kept_b
    return out
