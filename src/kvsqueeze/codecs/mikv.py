"""``mikv``: mixed precision by importance — important tokens at high bits, the rest at low bits, none dropped.

Paper: "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed Precision
Quantization", Yang et al., arXiv 2402.18096.

Composition: ``snapkv+mikv:high=4,low=2,ratio=0.8`` with the *cache's* eviction ratio 0 (``ratio=0`` or a
budget ≥ the context) — the scorer then evicts nothing, and MiKV reads its scores (``LayerContext.scores``,
set by the cache) to split what is stored: the ``ratio`` fraction of each head's tokens with the lowest scores go
to ``low`` bits, the rest to ``high`` bits. With a cache ratio > 0 the scorer evicts first and MiKV splits the
kept tokens. Without a scorer (``mikv`` alone) importance is the attention of the last ``window`` queries
(accumulated over the window and the query group), the paper's H2O/SnapKV-style importance.

Storage: both precisions use the KIVI layout (keys per-channel in groups of ``group`` tokens, values per-token in
channel groups), bit-packed, fp16 scales. Tokens flushed during decoding are stored at ``high`` bits (recent
tokens are important) and merged into the block.

Deviations: the paper balances query/key channels before low-bit per-token quantization; here the low-precision
keys are quantized per channel instead (KIVI), which addresses the same channel outliers. Within a head the
block keeps high-precision tokens before low-precision ones (attention does not depend on key order; positions
were applied by RoPE before caching).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from kvsqueeze.codecs.base import Codec
from kvsqueeze.codecs.quant import Bits, ChannelQ, QuantBlock, TokenQ, interleave
from kvsqueeze.core.attention_math import merge_partials
from kvsqueeze.core.storage import KVBlock
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import register


def _kivi(keys, values, lengths, bits, group) -> QuantBlock:
    size = min(group, keys.shape[-1])
    return QuantBlock(ChannelQ.encode(keys, lengths, bits, group), TokenQ.encode(values, bits, size), lengths)


class MixedBlock(KVBlock):
    """Two packed blocks of one layer: ``high`` (important tokens) and ``low`` precision, per head."""

    def __init__(self, high: QuantBlock, low: QuantBlock):
        self.high, self.low = high, low
        self.lengths = high.lengths + low.lengths
        self.dim = high.dim

    def materialize(self, dtype):
        hk, hv = self.high.materialize(dtype)
        lk, lv = self.low.materialize(dtype)
        a, b = self.high.lengths.flatten().tolist(), self.low.lengths.flatten().tolist()
        return interleave(hk, a, lk, b), interleave(hv, a, lv, b)

    def attend(self, q, scaling):
        parts = [blk.attend(q, scaling) for blk in (self.high, self.low) if int(blk.lengths.sum())]
        out = merge_partials(parts) if len(parts) > 1 else parts[0][0]
        return out, torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)


@register
class MiKVCodec(Codec):
    name = "mikv"
    family = "quantization"
    paper = "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed Precision Quantization"
    arxiv = "2402.18096"

    high: Bits = 4
    low: Bits = 2
    ratio: float = 0.8
    group: int = 32
    window: int = Field(32, ge=1)

    def importance(self, ctx) -> torch.Tensor:
        """Scores ``[B, H, L]``: the scorer's when the cache ran one, else attention of the last queries."""
        if ctx.scores is not None:
            return ctx.scores.float()
        attn = ctx.window_attention(self.window)  # [B, Hq, w, L]
        return ctx.per_kv_head(attn.sum(2))

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.ratio <= 1.0:
            raise KVSqueezeError(f"mikv ratio (fraction at low precision) must be in [0, 1], got {self.ratio}")

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        if ctx is None or ctx.stored is None:  # decode-time flush: recent tokens at high precision
            return _kivi(keys, values, lengths, self.high, self.group)
        scores = self.importance(ctx)[ctx.stored]  # flat, same order as keys/values
        counts = lengths.flatten().tolist()
        hi_mask = torch.zeros(len(scores), dtype=torch.bool, device=keys.device)
        start = 0
        for n in counts:
            n_high = n - math.floor(n * self.ratio + 1e-9)
            if n_high:
                top = scores[start : start + n].float().topk(n_high).indices
                hi_mask[start + top.sort().values] = True
            start += n
        hi_len = torch.tensor([int(m.sum()) for m in hi_mask.split(counts)]).view_as(lengths)
        high = _kivi(keys[hi_mask], values[hi_mask], hi_len, self.high, self.group)
        low = _kivi(keys[~hi_mask], values[~hi_mask], lengths - hi_len, self.low, self.group)
        return MixedBlock(high, low)

    def extend(self, block, newer):
        if isinstance(block, MixedBlock) and isinstance(newer, QuantBlock):
            merged = MixedBlock(block.high.merge(newer), block.low)
            return merged
        return None
