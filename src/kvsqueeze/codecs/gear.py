"""``gear``: uniform quantization + low-rank approximation of its error + sparse outliers.

Paper: "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative Inference of LLM",
Kang et al., arXiv 2403.05527.

Each of keys and values ``X`` (per encoded chunk) is stored as ``D̂ + L + S``:

- ``S``: sparse outliers — per token the ``⌈outliers · D⌉`` entries of largest magnitude, kept in fp16 with
  their uint8 channel index and restored exactly;
- ``D̂``: ``bits``-bit uniform quantization of ``X − S`` with the KIVI backbone (keys per-channel over groups
  of ``group`` tokens, values per-token in channel groups of ``group``; the paper's GEAR-KIVI) or per-token
  for both (``backbone=token``);
- ``L = A·B``: rank-``rank`` approximation of the quantization residual ``X − S − D̂`` per (row, head), found
  by randomized power iteration (``torch.svd_lowrank``, ``niter`` iterations), factors in fp16.

During decoding the tail is compressed ``group`` tokens at a time (the paper's streaming buffer), each chunk
its own block with its own low-rank factors.

Deviations: outliers are chosen per token (the paper filters per vector along the quantization axis); the
streaming buffer equals the quantization group (the paper uses n_b = 20).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from kvsqueeze.codecs.base import Codec
from kvsqueeze.codecs.quant import Bits, ChannelQ, TokenQ
from kvsqueeze.core.storage import KVBlock, PairBlock
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import register


class GearTensor:
    """One of keys/values: quantized backbone, low-rank factors ``A [N, r]``, ``B [BH, r, D]``, outliers."""

    def __init__(self, quant, A, B, out_idx, out_val, sizes: list[int]):
        self.quant, self.A, self.B, self.out_idx, self.out_val, self.sizes = quant, A, B, out_idx, out_val, sizes

    @classmethod
    def encode(cls, x, lengths, bits, per, group, rank, outliers, niter) -> GearTensor:
        D = x.shape[-1]
        if D > 256:
            raise KVSqueezeError(f"gear stores outlier channel indices as uint8: head_dim {D} > 256 is not supported")
        xf = x.float()
        k = math.ceil(outliers * D) if outliers > 0 else 0
        if k:
            out_idx = xf.abs().topk(k, dim=-1).indices
            out_val = xf.gather(1, out_idx).clamp(-65504, 65504).half()
            xf = xf.scatter(1, out_idx, 0.0)
            out_idx = out_idx.to(torch.uint8)
        else:
            out_idx = out_val = None
        size = min(group, D)
        quant = ChannelQ.encode(xf, lengths, bits, group) if per == "channel" else TokenQ.encode(xf, bits, size)
        sizes = lengths.flatten().tolist()
        A = B = None
        if rank > 0:
            resid = xf - quant.dequant(torch.float32)
            a_parts, b_parts = [], []
            for seg in resid.split(sizes):
                r = min(rank, *seg.shape) if seg.shape[0] else 0
                a = seg.new_zeros(seg.shape[0], rank)
                b = seg.new_zeros(rank, D)
                if r:
                    with torch.random.fork_rng(devices=[]):  # deterministic sketch, global RNG untouched
                        torch.manual_seed(0)
                        U, S, V = torch.svd_lowrank(seg, q=r, niter=niter)
                    a[:, :r], b[:r] = U * S, V.t()
                a_parts.append(a)
                b_parts.append(b)
            A = torch.cat(a_parts).half()
            B = torch.stack(b_parts).half()
        return cls(quant, A, B, out_idx, out_val, sizes)

    def dequant(self, dtype: torch.dtype) -> torch.Tensor:
        x = self.quant.dequant(dtype)
        if self.A is not None:
            if len(set(self.sizes)) == 1:
                L = self.sizes[0]
                low = torch.bmm(self.A.to(dtype).view(len(self.sizes), L, -1), self.B.to(dtype))
                x = x + low.view_as(x)
            else:  # ragged heads: one padded batched product, the real slots gathered back (no loop over heads)
                sizes = torch.tensor(self.sizes, dtype=torch.long)
                width = max(self.sizes)
                slots = torch.arange(width)
                take = (slots[None, :] < sizes[:, None]).flatten()  # [BH·W] slots holding a token, in flat order
                token = (torch.cumsum(sizes, 0) - sizes)[:, None] + slots[None, :]
                index = token.flatten()[take].to(x.device, non_blocking=True)
                where = take.nonzero().flatten().to(x.device, non_blocking=True)  # host tensor: no device read
                padded = x.new_zeros(len(self.sizes) * width, self.A.shape[-1])
                padded[where] = self.A.to(dtype)[index]
                low = torch.bmm(padded.view(len(self.sizes), width, -1), self.B.to(dtype)).flatten(0, 1)[where]
                x = x + low
        if self.out_idx is not None:
            x = x.scatter(1, self.out_idx.long(), self.out_val.to(dtype))
        return x


class GearBlock(PairBlock):
    """GEAR-compressed keys and values."""


@register
class GEARCodec(Codec):
    name = "gear"
    family = "quantization"
    paper = "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative Inference of LLM"
    arxiv = "2403.05527"

    bits: Bits = 2
    backbone: Literal["kivi", "token"] = "kivi"
    group: int = 32
    rank: int = 4
    outliers: float = 0.02
    niter: int = 2

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.outliers < 0.5 or self.rank < 0 or self.niter < 0:
            raise KVSqueezeError(
                "gear needs 0 <= outliers < 0.5, rank >= 0 and niter >= 0, e.g. gear:rank=4,outliers=0.02"
            )

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        key_per = "channel" if self.backbone == "kivi" else "token"
        args = (self.bits, self.group, self.rank, self.outliers, self.niter)
        k = GearTensor.encode(keys, lengths, self.bits, key_per, *args[1:])
        v = GearTensor.encode(values, lengths, self.bits, "token", *args[1:])
        return GearBlock(k, v, lengths, keys.shape[-1])
