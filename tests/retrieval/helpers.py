"""Shared pieces of the retrieval tests: ragged random tokens, a reference attention, dtype tolerances."""

from __future__ import annotations

import torch

from kvsqueeze.core.context import LayerContext


def ragged(lengths: list[list[int]], dim: int = 16, dtype=torch.float32, seed: int = 0):
    """Flat keys/values ``[N, D]`` for ``lengths [B, H]`` (keys with a few large channels, like real ones)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    n = int(lengths.sum())
    keys = torch.randn(n, dim, generator=g) * (1 + 4 * (torch.arange(dim) % 5 == 0))
    values = torch.randn(n, dim, generator=g)
    return keys.to(dtype), values.to(dtype), lengths


def reference(q: torch.Tensor, keys, values, lengths, scaling: float):
    """Exact attention (float64) of grouped queries ``q [B, H, M, D]`` over every stored token, segment by segment:
    ``(out [B, H, M, Dv], lse [B, H, M])``."""
    B, H = lengths.shape
    out = torch.zeros(*q.shape[:-1], values.shape[-1], dtype=torch.float64)
    lse = torch.zeros(q.shape[:-1], dtype=torch.float64)
    start = 0
    for b in range(B):
        for h in range(H):
            n = int(lengths[b, h])
            k, v = keys[start : start + n].double(), values[start : start + n].double()
            logits = q[b, h].double() @ k.T * scaling
            lse[b, h] = torch.logsumexp(logits, -1)
            out[b, h] = torch.softmax(logits, -1) @ v
            start += n
    return out, lse


def tolerance(dtype: torch.dtype) -> float:
    """A few ulps of the dtype at unit scale (outputs are averages of unit-scale values)."""
    return 16 * torch.finfo(dtype).eps


def context(keys, lengths, keep: int | None = None, positions=None) -> LayerContext:
    """The LayerContext a codec sees after a prefill of uniform rows (every token stored)."""
    B = lengths.shape[0]
    L = int(lengths.max())
    valid = torch.ones(B, L, dtype=torch.bool)
    stored = torch.arange(L)[None, None, :] < lengths[..., None]
    return LayerContext(
        layer_idx=0,
        num_layers=1,
        keys=keys,
        values=keys,
        queries=keys,
        valid=valid,
        scaling=1.0,
        positions=positions,
        keep=torch.full((B,), L if keep is None else keep),
        state={},
        shared={},
        stored=stored,
    )
