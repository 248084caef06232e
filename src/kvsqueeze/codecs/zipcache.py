"""``zipcache``: channel-separable token-wise quantization; salient tokens (normalized attention) at high bits.

Paper: "ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token Identification", He et al.,
arXiv 2405.14256.

- Channel-separable token-wise quantization (keys): every key channel ``j`` of a head is divided by
  ``c_j = sqrt(max_t |K[t, j]|)`` (fp16, one per channel and head), then each token is quantized per token;
  ``K̂ = c ⊙ Q(K / c)``. Attention multiplies the query by ``c`` instead of dequantizing (``q·(c⊙k') = (q⊙c)·k'``).
  Values: per-token quantization. Codes bit-packed, fp16 scale and zero per token (and channel group).
- Salient tokens by normalized attention: accumulated attention of probe queries divided by how many of them
  can see the token (``Σ_k A[k, i] / nnz(A[:, i])``), which removes the bias toward early tokens of plain
  accumulated attention. Probe queries: the most recent ``probe`` fraction plus an equal number of others drawn
  at random (seeded). The ``salient`` fraction of each head's tokens is stored at ``high`` bits, the rest at
  ``low`` bits.
- Tokens flushed during decoding are quantized at ``high`` bits with the layer's channel scales (``extend``).

Deviations: the paper re-identifies salient tokens while streaming (every 100 generated tokens); here decoded
tokens are kept at high precision. Within a head, salient tokens are stored before the others (attention does
not depend on key order).
"""

from __future__ import annotations

import math

import torch

from kvsqueeze.codecs.base import Codec
from kvsqueeze.codecs.mikv import MixedBlock
from kvsqueeze.codecs.quant import Bits, QuantBlock, TokenQ
from kvsqueeze.core.storage import DenseBlock, KVBlock
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import register


class CSTQBlock(QuantBlock):
    """Keys quantized per token after dividing channels by ``chan [BH, D]`` (fp16); values per token."""

    def __init__(self, keys: TokenQ, values: TokenQ, lengths: torch.Tensor, chan: torch.Tensor):
        super().__init__(keys, values, lengths)
        self.chan = chan

    def _token_chan(self, dtype) -> torch.Tensor:
        counts = self.lengths.flatten().to(self.chan.device)
        return self.chan.to(dtype).repeat_interleave(counts, dim=0, output_size=int(counts.sum()))

    def materialize(self, dtype):
        k, v = super().materialize(torch.float32)
        return (k * self._token_chan(torch.float32)).to(dtype), v.to(dtype)

    def attend(self, q, scaling):
        if not self.uniform:
            return KVBlock.attend(self, q, scaling)
        B, H = self.lengths.shape
        return super().attend(q * self.chan.to(q.dtype).view(B, H, 1, -1), scaling)

    @classmethod
    def encode(cls, keys, values, lengths, chan, bits, size) -> CSTQBlock:
        counts = lengths.flatten().to(chan.device)
        c_tok = chan.float().repeat_interleave(counts, dim=0, output_size=int(counts.sum()))
        return cls(TokenQ.encode(keys.float() / c_tok, bits, size), TokenQ.encode(values, bits, size), lengths, chan)

    def merge(self, newer: CSTQBlock) -> CSTQBlock:
        merged = super().merge(newer)
        return CSTQBlock(merged.keys, merged.values, merged.lengths, self.chan)


def normalized_attention(ctx, probe: float, seed: int = 0) -> torch.Tensor:
    """ZipCache's normalized attention score ``[B, H, L]`` from probe queries (recent + random)."""
    q = ctx.require_queries("zipcache", 1)
    Lq = q.shape[2]
    L = ctx.length
    n_recent = max(1, math.ceil(probe * Lq))
    older = Lq - n_recent
    gen = torch.Generator().manual_seed(seed)
    n_rand = min(older, n_recent)
    rand = torch.randperm(older, generator=gen)[:n_rand] if n_rand else torch.zeros(0, dtype=torch.long)
    idx = torch.cat([rand.sort().values, torch.arange(older, Lq)]).to(q.device)
    pos = idx + (L - Lq)  # key positions of the probe queries
    keys = ctx.keys.repeat_interleave(ctx.groups, dim=1)
    logits = torch.matmul(q[:, :, idx], keys.transpose(-1, -2)).float() * ctx.scaling  # [B, Hq, P, L]
    visible = torch.arange(L, device=q.device)[None, :] <= pos[:, None]  # [P, L]
    visible = visible[None, None] & ctx.valid[:, None, None, :]
    attn = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    nnz = visible.sum(2).clamp(min=1)  # probes that see each token  [B, 1, L]
    return ctx.per_kv_head(attn.sum(2) / nnz)


@register
class ZipCacheCodec(Codec):
    name = "zipcache"
    family = "quantization"
    paper = "ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token Identification"
    arxiv = "2405.14256"

    high: Bits = 4
    low: Bits = 2
    salient: float = 0.4
    probe: float = 0.05
    size: int = 0
    group: int = 32

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.salient <= 1.0 or not 0.0 < self.probe <= 1.0:
            raise KVSqueezeError("zipcache needs 0 <= salient <= 1 and 0 < probe <= 1, e.g. zipcache:salient=0.4")

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        if ctx is None or ctx.stored is None:  # decode flush: quantized by extend() with the layer's scales
            return DenseBlock(keys, values, lengths)
        D = keys.shape[-1]
        size = min(self.size, D) if self.size else D
        counts = lengths.flatten().tolist()
        chan = torch.stack(
            [
                k_h.float().abs().amax(0).clamp(min=1e-4).sqrt() if k_h.shape[0] else keys.new_ones(D)
                for k_h in keys.split(counts)
            ]
        ).half()
        scores = normalized_attention(ctx, self.probe)[ctx.stored]
        hi = torch.zeros(len(scores), dtype=torch.bool, device=keys.device)
        start = 0
        for n in counts:
            k = math.ceil(n * self.salient - 1e-9)
            if k:
                hi[start + scores[start : start + n].topk(k).indices] = True
            start += n
        hi_len = torch.tensor([int(m.sum()) for m in hi.split(counts)]).view_as(lengths)
        high = CSTQBlock.encode(keys[hi], values[hi], hi_len, chan, self.high, size)
        low = CSTQBlock.encode(keys[~hi], values[~hi], lengths - hi_len, chan, self.low, size)
        return MixedBlock(high, low)

    def extend(self, block, newer):
        if isinstance(block, MixedBlock) and isinstance(newer, DenseBlock):
            size = block.high.keys.size
            new = CSTQBlock.encode(newer.keys, newer.values, newer.lengths, block.high.chan, self.high, size)
            return MixedBlock(block.high.merge(new), block.low)
        return None
