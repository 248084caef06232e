"""ThinK — "ThinK: Thinner Key Cache by Query-Driven Pruning" (Xu et al., arXiv 2407.21018).

Per (row, KV head) the key channels that least affect ``q·k`` in the observation window are pruned and
*not stored*: channel ``c`` scores ``||Q_w[:, c] K[:, c]^T||_F = ||Q_w[:, c]|| · ||K[:, c]||`` (queries of the last
``window`` tokens, all query heads of the KV group; kept tokens of that head), and the top
``round(D · (1 - prune))`` channels are kept. The block holds the kept key channels, their indices
``[B, H, Dk]`` and the full values; attention uses ``q[..., kept]`` against the kept channels with the
model's original scaling.

Decisions and deviations:
- appended tokens (residual flushes during decoding, ``ctx=None``) are pruned with the channel set already
  chosen for that layer's block (``extend``); before any ThinK block exists they would be stored with all
  channels — never the case in practice, since the prefill compression comes first;
- GQA: channel scores sum the query heads of each KV group; values are not pruned (the paper's main
  setting prunes keys only);
- composes with any scorer (``snapkv+think:prune=0.5``) or alone (``think``: every token kept, channels pruned).
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvsqueeze.codecs.base import Codec
from kvsqueeze.core.attention_math import partial_attention, ragged_attention
from kvsqueeze.core.storage import KVBlock, interleave_segments
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import register


def head_ids(lengths: torch.Tensor) -> torch.Tensor:
    """Flat (row · H + head) index of every token of a flat ``[N, D]`` run with ``lengths [B, H]``."""
    return torch.repeat_interleave(torch.arange(lengths.numel()), lengths.flatten())


def channel_scores(keys: torch.Tensor, lengths: torch.Tensor, queries: torch.Tensor, window: int) -> torch.Tensor:
    """ThinK's channel criterion ``[B, H, D]``: ``||Q_w[:, c]|| · ||K[:, c]||`` per (row, KV head)."""
    B, H = lengths.shape
    Hq = queries.shape[1]
    q = queries[:, :, -window:].float()
    q_norm = q.pow(2).sum(2).view(B, H, Hq // H, -1).sum(2)  # [B, H, D]: ||Q[:, c]||² over the group's heads
    ids = head_ids(lengths).to(keys.device)
    k_norm = torch.zeros(B * H, keys.shape[-1], device=keys.device).index_add_(0, ids, keys.float().pow(2))
    return (q_norm.reshape(B * H, -1) * k_norm).sqrt().view(B, H, -1)


class ThinKBlock(KVBlock):
    """Kept key channels ``[N, Dk]`` + their indices ``[B, H, Dk]``; values ``[N, D]``."""

    def __init__(self, keys: torch.Tensor, channels: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor):
        self.keys, self.channels, self.values, self.lengths = keys, channels, values, lengths.cpu()
        self.head_dim = values.shape[-1]

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys with pruned channels as zeros (so ``q·k`` equals the kept-channel product), values as stored."""
        ids = head_ids(self.lengths).to(self.keys.device)
        B, H, Dk = self.channels.shape
        idx = self.channels.reshape(B * H, Dk)[ids]
        full = torch.zeros(self.keys.shape[0], self.head_dim, dtype=dtype, device=self.keys.device)
        return full.scatter_(1, idx, self.keys.to(dtype)), self.values.to(dtype)

    def attend(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, M, _ = q.shape
        q_kept = q.gather(-1, self.channels[:, :, None, :].expand(B, H, M, -1).to(q.device))
        keys, values = self.keys.to(q.dtype), self.values.to(q.dtype)
        host = self.host
        if host.uniform:
            L = host.width
            return partial_attention(q_kept, keys.view(B, H, L, -1), values.view(B, H, L, -1), scaling)
        return ragged_attention(q_kept, keys, values, self.lengths, scaling, width=host.width)  # one call, all heads


def _gather_channels(keys: torch.Tensor, lengths: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    B, H, Dk = channels.shape
    idx = channels.reshape(B * H, Dk)[head_ids(lengths).to(keys.device)]
    return keys.gather(1, idx)


@register
class ThinK(Codec):
    name = "think"
    family = "channel-pruning"
    paper = "ThinK: Thinner Key Cache by Query-Driven Pruning"
    arxiv = "2407.21018"
    prune: float = Field(0.5, ge=0.0, lt=1.0)
    window: int = Field(32, ge=1)

    def encode(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, ctx=None) -> KVBlock:
        B, H = lengths.shape
        D = keys.shape[-1]
        if ctx is None:  # a decoding flush: ``extend`` prunes it with the layer's channel set
            full = torch.arange(D, device=keys.device).expand(B, H, D).contiguous()
            return ThinKBlock(keys.contiguous(), full, values.contiguous(), lengths)
        if ctx.queries is None:
            raise KVSqueezeError("think needs the observation-window queries; use it with the prefill schedule")
        keep = max(1, round(D * (1.0 - self.prune)))
        scores = channel_scores(keys, lengths, ctx.queries, self.window)
        channels = torch.topk(scores, keep, dim=-1).indices.sort(dim=-1).values
        return ThinKBlock(
            _gather_channels(keys, lengths, channels).contiguous(), channels, values.contiguous(), lengths
        )

    def extend(self, block: KVBlock, newer: KVBlock) -> KVBlock | None:
        if not isinstance(block, ThinKBlock) or not isinstance(newer, ThinKBlock):
            return None
        new_keys = newer.keys
        if newer.keys.shape[-1] != block.keys.shape[-1]:
            new_keys = _gather_channels(newer.keys, newer.lengths, block.channels)
        a, b = block.host.counts, newer.host.counts
        keys = interleave_segments(block.keys, a, new_keys, b)
        values = interleave_segments(block.values, a, newer.values, b)
        return ThinKBlock(keys, block.channels, values, block.lengths + newer.lengths)
