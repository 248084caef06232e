"""``fp8``: 8-bit floating point keys and values (e4m3 or e5m2) with per-head scales.

Format: "FP8 Formats for Deep Learning", Micikevicius et al., arXiv 2209.05433 (the e4m3/e5m2 formats, stored
with torch's ``float8_e4m3fn`` / ``float8_e5m2`` dtypes). As in FP8 KV caches of serving engines, each tensor is
scaled so that its absolute maximum maps to the format's largest finite value; here one fp32 scale per
(row, KV head) and per encoded chunk (the prefill context is one chunk; decoding appends chunks of ``group``
tokens, merged into the same block).

Deviations: scales are computed from the data being encoded (dynamic), not calibrated offline.
"""

from __future__ import annotations

from typing import Literal

import torch

from kvsqueeze.codecs.base import Codec
from kvsqueeze.codecs.quant import interleave
from kvsqueeze.core.storage import KVBlock, PairBlock
from kvsqueeze.spec import register

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_TABLES: dict[tuple, torch.Tensor] = {}


def decode_fp8(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8 → ``dtype`` by a 256-entry table lookup on the raw bytes (faster than the CPU cast)."""
    key = (data.dtype, dtype, str(data.device))
    if key not in _TABLES:
        _TABLES[key] = torch.arange(256, dtype=torch.uint8, device=data.device).view(data.dtype).to(dtype)
    raw = data.view(torch.uint8).reshape(-1).to(torch.int32)
    return _TABLES[key].index_select(0, raw).view(data.shape)


class FP8Tensor:
    """``data [N, D]`` float8, ``scale [C]`` fp32 per chunk, ``sizes [C]`` int32 tokens per chunk."""

    def __init__(self, data, scale, sizes, counts: list[int]):
        self.data, self.scale, self.sizes, self.counts = data, scale, sizes, counts

    @classmethod
    def encode(cls, x: torch.Tensor, lengths: torch.Tensor, fmt: torch.dtype) -> FP8Tensor:
        sizes = lengths.flatten().to(torch.int32)
        keep = sizes > 0
        parts = x.float().split(sizes.tolist())
        amax = torch.stack([p.abs().amax() if p.numel() else x.new_zeros((), dtype=torch.float32) for p in parts])
        scale = (amax / torch.finfo(fmt).max).clamp(min=1e-12)
        per_token = scale.repeat_interleave(sizes.long().to(x.device))[:, None]
        data = (x.float() / per_token).to(fmt)
        return cls(data, scale[keep.to(scale.device)], sizes[keep], keep.long().tolist())

    def dequant(self, dtype: torch.dtype) -> torch.Tensor:
        n = self.data.shape[0]
        x = decode_fp8(self.data, dtype)
        if len(self.sizes) == 1:
            return x * self.scale.to(dtype)
        s = self.scale.to(dtype).repeat_interleave(self.sizes.long().to(self.data.device), output_size=n)
        return x * s[:, None]

    def merge(self, counts: list[int], newer: FP8Tensor, newer_counts: list[int]) -> FP8Tensor:
        return FP8Tensor(
            interleave(self.data, counts, newer.data, newer_counts),
            interleave(self.scale, self.counts, newer.scale, newer.counts),
            interleave(self.sizes, self.counts, newer.sizes, newer.counts),
            [a + b for a, b in zip(self.counts, newer.counts, strict=True)],
        )


class FP8Block(PairBlock):
    def __init__(self, keys: FP8Tensor, values: FP8Tensor, lengths: torch.Tensor):
        super().__init__(keys, values, lengths, keys.data.shape[-1])


@register
class FP8Codec(Codec):
    name = "fp8"
    family = "quantization"
    paper = "FP8 Formats for Deep Learning (e4m3/e5m2 KV cache, per-head scales)"
    arxiv = "2209.05433"

    format: Literal["e4m3", "e5m2"] = "e4m3"
    group: int = 32

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        fmt = FORMATS[self.format]
        return FP8Block(FP8Tensor.encode(keys, lengths, fmt), FP8Tensor.encode(values, lengths, fmt), lengths)

    def extend(self, block, newer):
        if not (isinstance(block, FP8Block) and isinstance(newer, FP8Block)):
            return None
        a, b = block.lengths.flatten().tolist(), newer.lengths.flatten().tolist()
        return FP8Block(
            block.keys.merge(a, newer.keys, b), block.values.merge(a, newer.values, b), block.lengths + newer.lengths
        )
