"""``bfp``: block floating point keys and values, key channels rearranged so outliers share blocks.

Paper: "Accurate Block Quantization in LLMs with Outliers", Trukhanov & Soloveychik, arXiv 2403.20137.

- Block floating point: along each token's channels, every ``block`` consecutive elements share one 8-bit
  exponent, that of the smallest power-of-two step ``2^e`` with ``max|x| ≤ (2^(bits-1) - 1)·2^e``; each element
  keeps a signed ``bits``-bit mantissa ``m = round(x / 2^e)``, stored offset-binary and bit-packed.
- K-sort channel rearrangement: each head's key channels are sorted by magnitude (max |k| over the context) so
  that outlier channels fall into the same blocks instead of forcing a large shared exponent on every block.
  Queries are permuted the same way inside attention (dot products are unchanged); the permutation is stored
  per head (int16). Values are stored in plain BFP.

Deviations: the permutation is fitted on the context being compressed (the paper fits it offline on calibration
data); tokens flushed during decoding are encoded with the permutation of the block they join.
"""

from __future__ import annotations

import torch

from kvsqueeze.codecs.base import Codec
from kvsqueeze.codecs.packing import pack, unpack_float
from kvsqueeze.codecs.quant import interleave
from kvsqueeze.core.storage import DenseBlock, KVBlock
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import register


class BFPTensor:
    """``codes [N, D·bits/8]`` packed offset-binary mantissas, ``exps [N, D/block]`` int8 shared exponents."""

    def __init__(self, codes, exps, bits: int, block: int, dim: int):
        self.codes, self.exps, self.bits, self.block, self.dim = codes, exps, bits, block, dim

    @classmethod
    def encode(cls, x: torch.Tensor, bits: int, block: int) -> BFPTensor:
        N, D = x.shape
        xs = x.float().view(N, D // block, block)
        qmax = (1 << (bits - 1)) - 1
        amax = xs.abs().amax(-1).clamp(min=2.0**-100)
        exps = torch.ceil(torch.log2(amax / qmax)).clamp(-127, 127)  # smallest power-of-two step covering amax
        step = torch.exp2(exps)[..., None]
        mant = (xs / step).round().clamp(-qmax, qmax)
        codes = (mant + qmax).to(torch.uint8).view(N, D)
        return cls(pack(codes, bits), exps.to(torch.int8), bits, block, D)

    def dequant(self, dtype=torch.float32) -> torch.Tensor:
        N = self.codes.shape[0]
        qmax = (1 << (self.bits - 1)) - 1
        mant = unpack_float(self.codes, self.bits, self.dim, dtype).view(N, -1, self.block) - qmax
        step = torch.exp2(self.exps.to(dtype))[..., None]
        return (mant * step).view(N, self.dim)

    def merge(self, counts, newer: BFPTensor, newer_counts) -> BFPTensor:
        codes = interleave(self.codes, counts, newer.codes, newer_counts)
        return BFPTensor(
            codes, interleave(self.exps, counts, newer.exps, newer_counts), self.bits, self.block, self.dim
        )


def ksort(keys: torch.Tensor) -> torch.Tensor:
    """K-sort: channels by decreasing max |k| (outliers together)."""
    return keys.abs().amax(0).argsort(descending=True, stable=True)


class BFPBlock(KVBlock):
    def __init__(self, perm, keys: BFPTensor, values: BFPTensor, lengths: torch.Tensor):
        self.perm, self.keys, self.values, self.lengths = perm, keys, values, lengths.cpu()
        self.dim = keys.dim

    def _token_perm(self, counts: list[int]) -> torch.Tensor:
        rep = torch.tensor(counts, device=self.perm.device)
        return self.perm.long().repeat_interleave(rep, dim=0, output_size=sum(counts))

    def materialize(self, dtype):
        sorted_keys = self.keys.dequant(torch.float32)
        keys = torch.empty_like(sorted_keys).scatter_(1, self._token_perm(self.lengths.flatten().tolist()), sorted_keys)
        return keys.to(dtype), self.values.dequant(dtype)

    def extend_raw(self, keys, values, lengths):
        counts = lengths.flatten().tolist()
        sorted_keys = keys.float().gather(1, self._token_perm(counts))
        nk = BFPTensor.encode(sorted_keys, self.keys.bits, self.keys.block)
        nv = BFPTensor.encode(values, self.values.bits, self.values.block)
        old = self.lengths.flatten().tolist()
        return BFPBlock(
            self.perm,
            self.keys.merge(old, nk, counts),
            self.values.merge(old, nv, counts),
            self.lengths + lengths.cpu(),
        )


@register
class BFPCodec(Codec):
    name = "bfp"
    family = "quantization"
    paper = "Accurate Block Quantization in LLMs with Outliers (block floating point, K-sort)"
    arxiv = "2403.20137"

    bits: int = 4
    block: int = 16
    ksort: bool = True
    group: int = 32

    def check(self) -> None:
        super().check()
        if not 2 <= self.bits <= 8 or self.block < 1:
            raise KVSqueezeError(f"bfp needs 2 <= bits <= 8 and block >= 1, got bits={self.bits}, block={self.block}")

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.block:
            raise KVSqueezeError(f"bfp needs a block dividing head_dim {head_dim}, e.g. bfp:bits=4,block=16")

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        if ctx is None:  # decode-time flush: encoded by extend() with the block's channel order
            return DenseBlock(keys, values, lengths)
        D = keys.shape[-1]
        self.check_head_dim(D)
        counts = lengths.flatten().tolist()
        perms = [
            ksort(k_h.float()) if self.ksort and k_h.shape[0] else torch.arange(D, device=keys.device)
            for k_h in keys.split(counts)
        ]
        perm = torch.stack(perms).to(torch.int16)
        rep = torch.tensor(counts, device=keys.device)
        sorted_keys = keys.float().gather(1, perm.long().repeat_interleave(rep, dim=0, output_size=sum(counts)))
        k = BFPTensor.encode(sorted_keys, self.bits, self.block)
        v = BFPTensor.encode(values, self.bits, self.block)
        return BFPBlock(perm, k, v, lengths)

    def extend(self, block, newer):
        if isinstance(block, BFPBlock) and isinstance(newer, DenseBlock):
            return block.extend_raw(newer.keys, newer.values, newer.lengths)
        return None
