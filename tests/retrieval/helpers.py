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


def ids(n: int, seed: int = 0) -> torch.Tensor:
    """``[1, n]`` random token ids of the tiny model's vocabulary."""
    return torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def generate(model, cache, prompt: torch.Tensor, n: int = 6) -> torch.Tensor:
    """Exactly ``n`` greedy tokens after ``prompt`` through ``cache``."""
    with torch.no_grad():
        return model.generate(prompt, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def one_step(model, spec: str, ratio: float, n: int = 400):
    """A cache of ``spec`` at ``ratio`` over ``n`` random tokens, then one decoded token: ``(cache, hot bytes at rest
    (the cache's own token ids left out), bytes fetched for that step, the full cache's bytes)``."""
    from kvsqueeze import CompressedCache

    cache = CompressedCache(model, spec, ratio=ratio)
    cache.prefill(model, ids(n))
    full = cache.full_nbytes()
    hot = cache.nbytes(tier="hot") - cache.tokens.numel() * 8  # the prefilled token ids are the cache's
    generate(model, cache, torch.cat([ids(n), ids(1, 9)], -1), n=1)
    return cache, hot, cache.stats()["fetched_bytes_per_token"], full


def segments(x: torch.Tensor, lengths: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """Flat ragged ``x [N, ...]`` ((row, head, token) order) split per (row, head) by ``lengths [B, H]``."""
    out, start = {}, 0
    for b, row in enumerate(lengths.tolist()):
        for h, n in enumerate(row):
            out[b, h] = x[start : start + n]
            start += n
    return out
