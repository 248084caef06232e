"""Selective recomputation: the keys and values of chosen tokens of a reused cache recomputed in context.

The chosen tokens run through the model once, at their own positions, with a mask under which token ``j`` sees the
reused keys/values of every earlier token that is *not* chosen and the recomputed ones of the chosen tokens up to
itself — so from layer to layer each chosen token's new state is what a full prefill would give if the tokens left
alone were exact (CacheBlend's layer-wise correction, the mechanism Cache-Craft and KVShare build on). The new
keys/values then replace the reused ones in place; nothing else changes.
"""

from __future__ import annotations

import torch

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.compat import with_cache
from kvsqueeze.errors import KVSqueezeError


@torch.no_grad()
def recompute_tokens(model, cache: CompressedCache, token_ids: torch.Tensor, positions: torch.Tensor) -> None:
    """Recompute ``positions`` (sorted, distinct, ``[k]``) of an uncompressed one-row ``cache`` holding
    ``token_ids [1, L]``; returns when every layer holds the new keys/values there."""
    L = cache.get_seq_length()
    if token_ids.shape != (1, L):
        raise KVSqueezeError(
            f"recomputation needs the {L} token ids the cache holds, got shape {tuple(token_ids.shape)}"
        )
    k = int(positions.numel())
    if k == 0:
        return
    if cache.method.spec() != "none" or any(layer.compressed for layer in cache.layers):
        raise KVSqueezeError("selective recomputation works on uncompressed caches (method none)")
    device = model.device
    positions = positions.to(torch.long).cpu()
    chosen = torch.zeros(L, dtype=torch.bool)
    chosen[positions] = True
    reused = (torch.arange(L)[None, :] < positions[:, None]) & ~chosen[None, :]  # [k, L]
    own = torch.arange(k)[None, :] <= torch.arange(k)[:, None]  # [k, k] the recomputed ones, causally
    visible = torch.cat([reused, own], dim=-1)[None, None].to(device)
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
    model(input_ids=token_ids[:, positions].to(device), position_ids=positions[None].to(device), attention_mask=mask,
          **with_cache(model, cache), use_cache=True, logits_to_keep=1)  # fmt: skip
    index = positions.to(device)
    for layer in cache.layers:
        keys, values = layer.keys[:, :, :L].clone(), layer.values[:, :, :L].clone()
        keys[:, :, index] = layer.keys[:, :, L:]
        values[:, :, index] = layer.values[:, :, L:]
        layer.keys, layer.values, layer.seen = keys, values, L
