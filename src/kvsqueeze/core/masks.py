"""The attention masks transformers builds, in every implementation's format, read as boolean visibility.

The cache reports its *logical* length to transformers, so a mask's key axis is logical: column ``j`` is the token
at logical index ``j`` (padding included); the mask of a compressed layer's uncompressed tail is its last columns.
Formats: ``None`` (causal, nothing padded), 4-D boolean (sdpa), 4-D additive float (eager), 2-D padding mask
(flash attention), and flex attention's ``BlockMask``.
"""

from __future__ import annotations

import torch

from kvsqueeze.errors import KVSqueezeError


def visibility(mask, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """Boolean ``[B|1, 1, q_len, kv_len]`` (True = the query sees the key) of the last ``kv_len`` key columns, or
    None when every query sees every earlier key (causal, no padding)."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        if mask.dim() == 4:
            cols = mask[..., -q_len:, -kv_len:] if kv_len else mask[..., -q_len:, :0]
            if cols.dtype != torch.bool:
                cols = cols > torch.finfo(cols.dtype).min / 2
            return cols
        if mask.dim() == 2:  # flash attention's padding mask [B, kv]: add causality among the queries
            pad = mask[:, -kv_len:].to(torch.bool) if kv_len else mask[:, :0].to(torch.bool)
            return pad[:, None, None, :] & causal(q_len, kv_len, device)
        raise KVSqueezeError(f"unsupported attention mask of shape {tuple(mask.shape)}")
    mask_mod = getattr(mask, "mask_mod", None)
    full_len = getattr(mask, "seq_lengths", (None, None))[1]
    if mask_mod is None or full_len is None:
        raise KVSqueezeError(f"unsupported attention mask type {type(mask).__name__}")
    q_idx = torch.arange(full_len - q_len, full_len, device=device)
    kv_idx = torch.arange(full_len - kv_len, full_len, device=device)
    b = torch.arange(batch, device=device)[:, None, None]
    seen = mask_mod(b, torch.zeros_like(b), q_idx[None, :, None], kv_idx[None, None, :])
    return seen.to(torch.bool).expand(batch, q_len, kv_len)[:, None]


def causal(q_len: int, kv_len: int, device) -> torch.Tensor:
    """``[q_len, kv_len]``: query ``i`` (the last ``q_len`` positions) sees keys up to its own position."""
    cols = torch.arange(kv_len, device=device)
    rows = torch.arange(q_len, device=device) + (kv_len - q_len)
    return cols[None, :] <= rows[:, None]


def valid_tokens(mask, batch: int, length: int, device) -> torch.Tensor:
    """Real (non-padding) tokens ``[B, L]`` of the last ``L`` columns: what the last query of each row may see."""
    seen = visibility(mask, batch, 1, length, device)
    if seen is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return seen[:, 0, -1, :].expand(batch, length).clone()
