"""The default codec: kept tokens stay at the model's dtype (no quantization)."""

from __future__ import annotations

import torch

from kvsqueeze.codecs.base import Codec
from kvsqueeze.core.storage import DenseBlock, KVBlock
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
