"""Attention over parts of a layer's storage, combined exactly by log-sum-exp.

Every partial returns ``(out, lse)``: the softmax-normalised output over its keys and the log-sum-exp of its logits,
so partials over disjoint key sets (blocks, the tail, an attention sink) merge into the exact attention
(:func:`merge_partials`). Logit soft-capping (Gemma-2) and key masks (padding, sliding windows) are applied inside
the partials; attention sinks (GPT-OSS) are one more partial with no values (:func:`sink_partial`).
"""

from __future__ import annotations

import torch

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def partial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [..., M, D]`` over ``k, v [..., L, D]``: (normalised output, log-sum-exp ``[..., M]``)."""
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0)
    return torch.matmul(probs.to(v.dtype), v), lse


def fused_partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`partial_attention` without a mask through PyTorch's fused CPU attention kernel (which also returns the
    log-sum-exp) when it applies; elsewhere the reference path. ``q [B, H, M, D]`` with ``k, v [B, H, N, D]``."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    fused = op is not None and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype and q.dtype in FUSED_DTYPES
    if not fused or q.dim() != 4 or k.shape[-2] == 0:
        return partial_attention(q, k, v, scaling)
    out, lse = op(q, k, v, 0.0, False, scale=scaling)[:2]
    return out, lse.float()


def causal_partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal :func:`partial_attention` of ``q [B, H, M, D]`` over ``k, v [B, H, M, D]`` (query ``i`` sees keys
    ``0..i``) through PyTorch's fused CPU kernel when it applies; elsewhere the reference path with a mask."""
    if fused_applies(q, k, v) and k.shape[-2] > 0:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scaling)[:2]
        return out, lse.float()
    M = q.shape[-2]
    causal = torch.ones(M, k.shape[-2], dtype=torch.bool, device=q.device).tril()
    return partial_attention(q, k, v, scaling, mask=causal)


def ragged_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    key_mask: torch.Tensor | None = None,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention of grouped queries ``q [B, H, G*M, D]`` over flat ragged ``keys/values [N, D]``
    (``lengths [B, H]`` on the CPU, (row, head, token) order) in one call: the segments are gathered into a padded
    ``[B, H, Lmax, D]`` view with a mask. ``key_mask``: bool ``[N]`` (False hides a key from every query) or
    ``[M, N]`` (per query token). ``width``: the longest segment when the caller knows it (no read of ``lengths``)."""
    B, H = lengths.shape
    flat = lengths.flatten()
    if width is None:
        width = int(flat.max()) if flat.numel() else 0
    if width == 0:
        out = torch.zeros(*q.shape[:-1], values.shape[-1], dtype=q.dtype, device=q.device)
        return out, torch.full(q.shape[:-1], float("-inf"), device=q.device)
    flat_dev = flat.to(keys.device, non_blocking=True)  # host → device: never a synchronisation
    starts = torch.cumsum(flat_dev, 0) - flat_dev
    slot = torch.arange(width, device=keys.device)
    present = slot[None, :] < flat_dev[:, None]  # [BH, W]
    index = (starts[:, None] + slot[None, :]).clamp(max=keys.shape[0] - 1)
    flat_index = index.flatten()
    padded_k = keys.index_select(0, flat_index).view(B, H, width, -1)  # index_select: a fast contiguous gather
    padded_v = values.index_select(0, flat_index).view(B, H, width, -1)
    mask = present.view(B, H, 1, width)
    if key_mask is not None:
        if key_mask.dim() == 1:
            mask = mask & key_mask[index].view(B, H, 1, width)
        else:  # [M, N] → [B, H, G*M, W], rows in (group, token) order like q
            M = key_mask.shape[0]
            per_query = key_mask[:, index].view(M, B, H, width).permute(1, 2, 0, 3)  # [B, H, M, W]
            G = q.shape[2] // M
            mask = mask & per_query[:, :, None].expand(B, H, G, M, width).reshape(B, H, G * M, width)
    if softcap is None and fused_applies(q, padded_k, padded_v):
        return fused_masked_attention(q, padded_k, padded_v, scaling, mask)
    return partial_attention(q, padded_k, padded_v, scaling, mask=mask, softcap=softcap)


def fused_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether PyTorch's fused CPU attention kernel (which returns the log-sum-exp) can take these tensors."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    same = q.dtype == k.dtype == v.dtype and q.shape[-1] == k.shape[-1] == v.shape[-1]  # ThinK prunes key channels
    return op is not None and q.device.type == "cpu" and same and q.dtype in FUSED_DTYPES and q.dim() == 4


def fused_masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`partial_attention` with a boolean ``mask`` (broadcastable to ``[B, H, M, L]``) through the fused CPU
    kernel: the mask becomes additive; a query that sees no key gets output 0 and log-sum-exp -inf."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    out, lse = op(q, k, v, 0.0, False, attn_mask=additive, scale=scaling)[:2]
    blind = ~mask.any(-1)  # [B, H, M|1]
    return out, lse.float().masked_fill(blind, float("-inf"))


def sink_partial(sinks: torch.Tensor, like: torch.Tensor, groups: int, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention sink (one learned logit per query head, no value) as a partial of grouped queries
    ``like [B, H, groups * q_len, D]``: zero output, log-sum-exp = the sink logit."""
    B, H = like.shape[:2]
    lse = sinks.float().view(H, groups, 1).expand(H, groups, q_len).reshape(1, H, groups * q_len).expand(B, -1, -1)
    return torch.zeros_like(like), lse


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine partial attentions (output, log-sum-exp) over disjoint key sets into the exact result."""
    if len(parts) == 1:
        return parts[0][0]
    lses = torch.stack([lse for _, lse in parts])  # [P, ...]
    top = lses.max(dim=0).values
    weights = torch.exp(lses - top).nan_to_num(0.0)
    total = weights.sum(dim=0).clamp(min=1e-30)
    out = sum(w.unsqueeze(-1) * o.float() for (o, _), w in zip(parts, weights, strict=True))
    return (out / total.unsqueeze(-1)).to(parts[0][0].dtype)
