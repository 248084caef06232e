"""The codec axis: how kept tokens are stored, and the blocks that hold them.

A :class:`KVBlock` is an immutable run of kept tokens of one layer, per (row, KV head): ``lengths [B, H]``
may differ between heads (ragged storage). Its bytes are the bytes of the tensors it holds. Attention
reads a block through :meth:`KVBlock.attend`, which returns a partial result (output and log-sum-exp) so
blocks of different codecs and the full-precision tail combine exactly.
"""

from __future__ import annotations

import torch

from kvsqueeze.spec import Component


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [..., M, D]`` over ``k, v [..., L, D]``: (normalised output, log-sum-exp ``[..., M]``)."""
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * scaling
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0)
    return torch.matmul(probs.to(v.dtype), v), lse


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`partial_attention` without a mask, through PyTorch's fused CPU attention kernel (which also returns
    the log-sum-exp) when it applies — one kernel instead of six, which matters for ragged heads while decoding.
    ``q [M, D]`` with ``k, v [N, D]``, or ``[B, H, M, D]`` with ``[B, H, N, D]``."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    fused = op is not None and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype and q.dtype in FUSED_DTYPES
    if not fused or q.dim() not in (2, 4):
        return partial_attention(q, k, v, scaling)
    if q.dim() == 2:
        out, lse = op(q[None, None], k[None, None], v[None, None], 0.0, False, scale=scaling)[:2]
        return out[0, 0], lse[0, 0].float()
    out, lse = op(q, k, v, 0.0, False, scale=scaling)[:2]
    return out, lse.float()


class KVBlock:
    """Kept tokens of one layer in some storage format; subclasses define ``materialize`` and ``nbytes``."""

    lengths: torch.Tensor  # [B, H] long, on CPU

    @property
    def uniform(self) -> bool:
        return bool((self.lengths == self.lengths.flatten()[0]).all())

    def nbytes(self) -> int:
        raise NotImplementedError

    def bits_per_element(self) -> float:
        """Bytes held × 8 per stored key/value element (needs ``self.dim``, the head dim)."""
        return 8.0 * self.nbytes() / (2 * max(int(self.lengths.sum()), 1) * self.dim)

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision keys/values, flat ``[N, D]`` in (row, head, token) order: a transient copy."""
        raise NotImplementedError

    def attend(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial attention of grouped queries ``q [B, H, M, D]`` (M = groups × query tokens)."""
        keys, values = self.materialize(q.dtype)
        B, H = self.lengths.shape
        if self.uniform:
            L = int(self.lengths[0, 0])
            return fused_partial_attention(q, keys.view(B, H, L, -1), values.view(B, H, L, -1), scaling)
        out = torch.zeros(*q.shape[:-1], values.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)
        sizes = self.lengths.flatten().tolist()
        for i, (k_h, v_h) in enumerate(zip(keys.split(sizes), values.split(sizes), strict=True)):
            if k_h.shape[0]:
                b, h = divmod(i, H)
                out[b, h], lse[b, h] = fused_partial_attention(q[b, h], k_h, v_h, scaling)
        return out, lse


class PairBlock(KVBlock):
    """Keys and values as two encoded tensors, each with ``nbytes()`` and ``dequant(dtype)`` (flat ``[N, D]``)."""

    def __init__(self, keys, values, lengths: torch.Tensor, dim: int):
        self.keys, self.values, self.lengths, self.dim = keys, values, lengths.cpu(), dim

    def nbytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes()

    def materialize(self, dtype):
        return self.keys.dequant(dtype), self.values.dequant(dtype)


class DenseBlock(KVBlock):
    """Kept tokens at the model's dtype, flat ``[N, D]`` with per-head lengths (ragged-capable)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor):
        self.keys, self.values, self.lengths = keys, values, lengths.cpu()

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values)

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys.to(dtype), self.values.to(dtype)


class Codec(Component):
    """Encodes kept tokens into a :class:`KVBlock`.

    ``residual``: most recent tokens held at full precision in the tail; ``group``: the tail is flushed to
    encoded blocks in multiples of this many tokens.
    """

    axis = "codec"
    residual: int = 0
    group: int = 1

    @property
    def is_dense(self) -> bool:
        return False

    def encode(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, ctx=None) -> KVBlock:
        """``keys, values``: flat ``[N, D]`` in (row, head, token) order; ``lengths [B, H]``.

        ``ctx`` is the :class:`~kvsqueeze.policies.base.LayerContext` of a compression (queries, positions,
        layer index) and ``None`` when the tail's residual window is flushed during decoding.
        """
        raise NotImplementedError

    def extend(self, block: KVBlock, newer: KVBlock) -> KVBlock | None:
        """Append ``newer`` tokens to ``block`` (one block to attend over); None keeps them separate."""
        return None
