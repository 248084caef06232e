"""``kivi``: KIVI — keys per-channel, values per-token, recent tokens in full precision.

Paper: "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", Liu et al., arXiv 2402.02750.

- Keys: per-channel asymmetric quantization over groups of ``group`` consecutive tokens (fp16 scale and zero
  per group and channel). Values: per-token, channels in groups of ``group`` (the paper's group size G for
  both). Codes are bit-packed.
- The most recent ``residual`` tokens (the paper's R) stay in full precision in the cache's tail; during
  decoding, once ``group`` tokens beyond the residual exist they are quantized as one key group and merged
  into the quantized block (``extend``), as in the paper's streaming algorithm.

Deviations: at prefill the paper keeps the ``L mod G`` remaining tokens plus the residual in full precision;
here exactly ``residual`` tokens stay in full precision and a head's last key group before them may hold fewer
than ``group`` tokens (quantized as a short group). After eviction (e.g. ``snapkv+kivi``) groups are formed
from each head's kept tokens in order. Values' channel group is ``min(group, head_dim)``.
"""

from __future__ import annotations

from kvsqueeze.codecs.base import Codec
from kvsqueeze.codecs.intquant import merge_blocks
from kvsqueeze.codecs.quant import Bits, ChannelQ, QuantBlock, TokenQ
from kvsqueeze.core.storage import KVBlock
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import register


@register
class KIVICodec(Codec):
    name = "kivi"
    family = "quantization"
    paper = "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"
    arxiv = "2402.02750"

    bits: Bits = 2
    group: int = 32
    residual: int = 128

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % min(self.group, head_dim):
            raise KVSqueezeError(f"kivi group {self.group} must divide the head dimension {head_dim} or exceed it")

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        D = keys.shape[-1]
        self.check_head_dim(D)
        size = min(self.group, D)
        k = ChannelQ.encode(keys, lengths, self.bits, self.group)
        v = TokenQ.encode(values, self.bits, size)
        return QuantBlock(k, v, lengths)

    def extend(self, block, newer):
        return merge_blocks(block, newer)
