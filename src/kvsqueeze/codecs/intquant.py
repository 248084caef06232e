"""``int``: uniform asymmetric integer quantization, per token or per channel — the baseline codec.

Not one paper: the round-to-nearest min/max quantizer that the KV-cache quantization literature compares
against (e.g. the "per-token / per-channel" baselines of KIVI, arXiv 2402.02750). Codes are bit-packed; scale
and zero-point are fp16 per group. ``per=token``: each token's channels in groups of ``size`` (0 = the whole
head); ``per=channel``: each channel over groups of ``group`` consecutive tokens of one head (the tail is then
flushed ``group`` tokens at a time, so every group but a head's last is full).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator

from kvsqueeze.codecs.base import Codec
from kvsqueeze.codecs.quant import Bits, ChannelQ, QuantBlock, TokenQ
from kvsqueeze.core.storage import KVBlock
from kvsqueeze.spec import register


def quantize(x: torch.Tensor, lengths: torch.Tensor, bits: int, axis: str, size: int, group: int):
    """Quantize flat tokens ``x [N, D]`` along ``axis`` (shared by the codecs built on this quantizer)."""
    if axis == "token":
        return TokenQ.encode(x, bits, size)
    return ChannelQ.encode(x, lengths, bits, group)


def merge_blocks(block: KVBlock, newer: KVBlock) -> KVBlock | None:
    if isinstance(block, QuantBlock) and isinstance(newer, QuantBlock):
        return block.merge(newer)
    return None


@register
class IntCodec(Codec):
    name = "int"
    family = "quantization"
    paper = "uniform asymmetric integer quantization (baseline)"

    bits: Bits = 4
    per: Literal["token", "channel"] = "token"
    size: int = 0

    @model_validator(mode="before")
    @classmethod
    def _channel_groups(cls, data):
        if isinstance(data, dict) and data.get("per") == "channel" and "group" not in data:
            data = {**data, "group": 32}
        return data

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        g = max(self.group, 1)
        k = quantize(keys, lengths, self.bits, self.per, self.size, g)
        v = quantize(values, lengths, self.bits, self.per, self.size, g)
        return QuantBlock(k, v, lengths)

    def extend(self, block, newer):
        return merge_blocks(block, newer)
