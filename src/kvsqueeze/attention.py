"""The ``"kvsqueeze"`` attention implementation, registered with transformers' public interfaces.

- A layer that holds every token uncompressed runs transformers' own SDPA attention, bit for bit, then
  compresses itself when its schedule says so (the queries are in hand: no recomputation).
- A compressed layer attends over what it keeps: dense uniform storage through SDPA with a mask built
  for the kept tokens; encoded or ragged blocks through partial attentions merged by log-sum-exp.
- Layers of other caches (or sliding-window layers) fall through to SDPA unchanged.
"""

from __future__ import annotations

import time

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvsqueeze.codecs.base import fused_partial_attention, partial_attention

NAME = "kvsqueeze"


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine partial attentions (output, log-sum-exp) over disjoint key sets into the exact result."""
    lses = torch.stack([lse for _, lse in parts])  # [P, ...]
    top = lses.max(dim=0).values
    weights = torch.exp(lses - top).nan_to_num(0.0)
    total = weights.sum(dim=0).clamp(min=1e-30)
    out = sum(w.unsqueeze(-1) * o.float() for (o, _), w in zip(parts, weights, strict=True))
    return (out / total.unsqueeze(-1)).to(parts[0][0].dtype)


def _compressed_attention(layer, module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    q_len = query.shape[2]
    mask = layer.tail_mask(attention_mask, q_len)
    if not layer.blocks:
        return sdpa_attention_forward(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
        )
    B, Hq, M, D = query.shape
    H = key.shape[1]
    G = Hq // H
    grouped = query.reshape(B, H, G * M, D)
    parts = [block.attend(grouped, scaling) for block in layer.blocks]
    if key.shape[2]:
        tail = (
            None if mask is None else mask.unsqueeze(2).expand(-1, -1, G, -1, -1).reshape(mask.shape[0], 1, G * M, -1)
        )
        if tail is None:  # decoding: every tail token visible, one fused kernel
            parts.append(fused_partial_attention(grouped, key, value, scaling))
        else:
            parts.append(partial_attention(grouped, key, value, scaling, tail))
    out = merge_partials(parts).view(B, Hq, M, -1)
    return out.transpose(1, 2).contiguous(), None


def kvsqueeze_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from kvsqueeze.cache import _ACTIVE

    cache = getattr(_ACTIVE, "cache", None)
    layer = cache.active_layer(module.layer_idx, key) if cache is not None else None
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    decode_step = getattr(cache.method.schedule, "decode_step", None)  # decoding schedules see every pass
    if layer.compressed:
        out = _compressed_attention(layer, module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    else:
        out = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if decode_step is not None:
        start = time.perf_counter()
        decode_step(cache, layer, module, query, attention_mask, scaling, kwargs.get("position_ids"))
        cache.compression_seconds += time.perf_counter() - start
    elif not layer.compressed and cache.wants_compression(layer, query.shape[2]):
        start = time.perf_counter()
        cache.compress_layer(layer, query, attention_mask, scaling, kwargs.get("position_ids"))
        cache.compression_seconds += time.perf_counter() - start
    return out


_registered: set[str] = set()


def register_attention(name: str, function) -> None:
    """Register ``function`` (and transformers' SDPA mask) under ``name`` with transformers' interfaces, once."""
    if name not in _registered:
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)
        _registered.add(name)


def ensure_registered(model=None) -> None:
    """Register the attention and mask functions (once) and switch ``model`` to them."""
    register_attention(NAME, kvsqueeze_attention)
    if model is not None and model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)
