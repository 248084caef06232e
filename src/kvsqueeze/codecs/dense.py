"""The default codec: kept tokens stay at the model's dtype (no quantization)."""

from __future__ import annotations

import torch

from kvsqueeze.codecs.base import Codec
from kvsqueeze.core.storage import DenseBlock, KVBlock, interleave_segments
from kvsqueeze.spec import register


@register
class DenseCodec(Codec):
    name = "dense"
    family = "codec"
    paper = "full-precision storage (default)"

    @property
    def is_dense(self) -> bool:
        return True

    def encode(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, ctx=None) -> KVBlock:
        return DenseBlock(keys.contiguous(), values.contiguous(), lengths)

    def extend(self, block: KVBlock, newer: KVBlock) -> KVBlock | None:
        """Two dense blocks as one: each (row, head) segment of ``block`` followed by ``newer``'s (one gather)."""
        if type(block) is not DenseBlock or type(newer) is not DenseBlock or block.positions is not None:
            return None
        a, b = block.host.counts, newer.host.counts
        keys = interleave_segments(block.keys, a, newer.keys.to(block.keys.dtype), b)
        values = interleave_segments(block.values, a, newer.values.to(block.values.dtype), b)
        return DenseBlock(keys, values, block.lengths + newer.lengths)
