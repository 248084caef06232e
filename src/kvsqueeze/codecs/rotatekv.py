"""``rotatekv``: 2-bit KV cache after outlier-aware fast Walsh–Hadamard rotation, attention sinks protected.

Paper: "RotateKV: Accurate and Robust 2-Bit KV Cache Quantization for LLMs via Outlier-Aware Adaptive
Rotations", Su et al., arXiv 2501.16383.

- Outlier-aware rotation: each head's key channels are reordered by magnitude (max |k| over the context) and
  dealt round-robin to the ``block``-sized Hadamard groups, so every group gets a balanced share of outlier
  channels; then a normalized fast Walsh–Hadamard transform (orthogonal, self-inverse) rotates each group.
  Values are rotated by the plain transform. The permutation is stored per head (int16).
- Attention reads the rotated codes directly: the query is permuted and rotated the same way (rotations
  preserve dot products) and the attention output is rotated back.
- Attention-sink-aware quantization: the first ``sinks`` kept tokens of each head stay at full precision (fp16).
- Rotated keys and values: per-token ``bits``-bit uniform quantization, channel groups of ``size``.

Deviations: the paper rotates pre-RoPE keys across grouped heads; here post-RoPE keys are rotated within each
head (exact either way; the grouping differs). The reordering is fitted on the context being compressed, not on
offline calibration data. Tokens flushed during decoding are quantized with the permutation of the block they
join (``extend``); ``block=0`` means the whole head (then the reordering cannot change the result).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from kvsqueeze.codecs.base import Codec
from kvsqueeze.codecs.quant import Bits, TokenQ, interleave
from kvsqueeze.core.attention_math import partial_attention
from kvsqueeze.core.storage import DenseBlock, KVBlock
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import register


def fwht(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Normalized fast Walsh–Hadamard transform over groups of ``block`` channels (a power of two): orthogonal,
    its own inverse, ``O(n log n)`` butterflies."""
    n = x.shape[-1]
    block = block or n
    if block & (block - 1) or n % block:
        raise KVSqueezeError(f"Hadamard block {block} must be a power of two dividing the head dimension {n}")
    shape = x.shape
    y = x.reshape(-1, n // block, block)
    h = 1
    while h < block:
        y = y.view(y.shape[0], n // block, block // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return y.reshape(shape) / math.sqrt(block)


def outlier_order(keys: torch.Tensor, block: int) -> torch.Tensor:
    """Channel permutation ``[D]``: channels by decreasing max |k|, dealt round-robin to the Hadamard groups."""
    D = keys.shape[-1]
    order = keys.abs().amax(0).argsort(descending=True, stable=True)
    groups = D // block
    return torch.cat([order[g::groups] for g in range(groups)])


class RotateBlock(KVBlock):
    """``perm [BH, D]`` int16, rotated keys/values as :class:`TokenQ`, fp16 sinks ``[S, D]`` per head first."""

    def __init__(self, perm, keys: TokenQ, values: TokenQ, sink_k, sink_v, sink_counts, body_counts, block, shape):
        self.perm, self.keys, self.values, self._shape = perm, keys, values, shape
        self.sink_k, self.sink_v, self.sink_counts, self.body_counts = sink_k, sink_v, sink_counts, body_counts
        self.block, self.dim = block, keys.dim

    @property
    def lengths(self) -> torch.Tensor:
        B, H = self._shape
        return torch.tensor([a + b for a, b in zip(self.sink_counts, self.body_counts, strict=True)]).view(B, H)

    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes() / (2 * max(sum(self.sink_counts) + sum(self.body_counts), 1) * self.dim)

    def _per_token_perm(self) -> torch.Tensor:
        rep = torch.tensor(self.body_counts, device=self.perm.device)
        return self.perm.long().repeat_interleave(rep, dim=0, output_size=sum(self.body_counts))

    def materialize(self, dtype):
        rk, rv = fwht(self.keys.dequant(torch.float32), self.block), fwht(self.values.dequant(torch.float32))
        keys = torch.empty_like(rk).scatter_(1, self._per_token_perm(), rk)
        keys = interleave(self.sink_k.float(), self.sink_counts, keys, self.body_counts)
        values = interleave(self.sink_v.float(), self.sink_counts, rv, self.body_counts)
        return keys.to(dtype), values.to(dtype)

    def attend(self, q, scaling):
        from kvsqueeze.core.attention_math import merge_partials

        counts = self.body_counts
        if len(set(counts)) != 1 or len(set(self.sink_counts)) != 1:
            return super().attend(q, scaling)
        B, H, M, D = q.shape
        BH, L, S = B * H, counts[0], self.sink_counts[0]
        qf = q.float().reshape(BH, M, D)
        qr = fwht(qf.gather(2, self.perm.long()[:, None, :].expand(BH, M, D)), self.block)
        parts = []
        if L:
            logits = self.keys.scores(qr, BH, L) * scaling
            lse = torch.logsumexp(logits, dim=-1)
            out = fwht(self.values.weighted(torch.exp(logits - lse.unsqueeze(-1)), BH, L))
            parts.append((out.view(B, H, M, D), lse.view(B, H, M)))
        if S:
            sk, sv = self.sink_k.float().view(B, H, S, D), self.sink_v.float().view(B, H, S, D)
            parts.append(partial_attention(q.float(), sk, sv, scaling))
        out = merge_partials(parts) if len(parts) > 1 else parts[0][0]
        lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
        return out.to(q.dtype), lse

    def extend_raw(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, bits: int, size: int):
        """Quantize newly flushed full-precision tokens with this block's permutation and append them."""
        counts = lengths.flatten().tolist()
        rep = torch.tensor(counts, device=keys.device)
        perm = self.perm.long().repeat_interleave(rep, dim=0, output_size=sum(counts))
        rk = fwht(keys.float().gather(1, perm), self.block)
        nk, nv = TokenQ.encode(rk, bits, size), TokenQ.encode(fwht(values.float()), bits, size)
        return RotateBlock(
            self.perm,
            self.keys.merge(self.body_counts, nk, counts),
            self.values.merge(self.body_counts, nv, counts),
            self.sink_k,
            self.sink_v,
            self.sink_counts,
            [a + b for a, b in zip(self.body_counts, counts, strict=True)],
            self.block,
            self._shape,
        )


@register
class RotateKVCodec(Codec):
    name = "rotatekv"
    family = "quantization"
    paper = "RotateKV: Accurate and Robust 2-Bit KV Cache Quantization via Outlier-Aware Adaptive Rotations"
    arxiv = "2501.16383"

    bits: Bits = 2
    size: int = 32
    block: int = Field(0, ge=0)
    sinks: int = Field(4, ge=0)
    group: int = 32

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        if ctx is None:  # decode-time flush: kept raw until extend() quantizes it with the layer's permutation
            return DenseBlock(keys, values, lengths)
        D = keys.shape[-1]
        block = self.block or D
        size = min(self.size, D) if self.size else D
        B, H = lengths.shape
        counts = lengths.flatten().tolist()
        sink_counts = [min(self.sinks, n) for n in counts]
        body_counts = [n - s for n, s in zip(counts, sink_counts, strict=True)]
        perms, sk, sv, bk, bv = [], [], [], [], []
        for k_h, v_h, s in zip(keys.split(counts), values.split(counts), sink_counts, strict=True):
            perms.append(
                outlier_order(k_h[s:].float(), block) if k_h.shape[0] > s else torch.arange(D, device=keys.device)
            )
            sk.append(k_h[:s])
            sv.append(v_h[:s])
            bk.append(fwht(k_h[s:].float()[:, perms[-1]], block))
            bv.append(fwht(v_h[s:].float()))
        perm = torch.stack(perms).to(torch.int16)
        return RotateBlock(
            perm,
            TokenQ.encode(torch.cat(bk), self.bits, size),
            TokenQ.encode(torch.cat(bv), self.bits, size),
            torch.cat(sk).half(),
            torch.cat(sv).half(),
            sink_counts,
            body_counts,
            block,
            (B, H),
        )

    def extend(self, block, newer):
        if isinstance(block, RotateBlock) and isinstance(newer, DenseBlock):
            size = min(self.size, block.dim) if self.size else block.dim
            return block.extend_raw(newer.keys, newer.values, newer.lengths, self.bits, size)
        return None
