"""``quest``: query-aware page selection from per-channel key bounds, pages fetched from the cold tier.

Paper: "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", Tang et al., arXiv 2406.10774.

- The stored keys of every (row, KV head) are cut into pages of ``page`` consecutive tokens; each page is
  summarised by the element-wise minimum and maximum of its keys (kept hot, at the model's dtype). The full
  keys and values go to the cold tier (:class:`~kvsqueeze.core.tiers.ColdStore`, ``tier=ram|disk``).
- Per decoding step the upper bound ``sum_c max(q_c min_c, q_c max_c)`` of every page's ``q·k`` is computed (as
  ``relu(q)·max + min(q, 0)·min``, float32), the top pages are selected, fetched from cold and attended together
  with the recent window (the cache's full-precision tail, ``residual`` tokens) by log-sum-exp.
- Hot budget: ``ratio``/``budget`` give each head's hot tokens; the page summaries (two vectors per page: one
  token's worth, plus an int32 count) and the window are charged first, the rest is fetched per step in whole pages
  (``fetch=`` overrides; with a scorer the kept tokens are all fetched unless ``fetch`` is given).

- ``select=token`` (default): in a forward of several tokens (a question appended to a compressed context) every
  query token selects its own top pages and attends only to them, as it would decoding one token at a time (the
  paper's decoding steps have one query; its prefill is dense). ``select=step``: one selection (the largest bound
  over the forward's tokens) for the whole forward, the behaviour before this option.
- ``summary_bits=8``: the page minima and maxima stored as 8-bit codes of a per-(row, head, channel) range, the
  maximum rounded up and the minimum down, so the bound stays an upper bound (slightly looser) at a quarter of
  float32's summary bytes; the saved hot bytes are fetched as more pages. ``0`` (default): the model's dtype, as
  in the paper.

Deviations: grouped-query attention selects pages per KV head by the largest bound over the head's query heads;
the paper selects per query head (no GQA). The first two layers are not kept dense (the paper skips them): at a
hot budget of 1/8 two dense layers of 30 would take half of it. ``select=token`` fetches every token's pages
(duplicates included; all pages at once when that is fewer) and is metered so; the paper has no multi-token sparse
forward. ``summary_bits=8`` is not in the paper. Tokens decoded after the prefill stay in the hot window (``group``
tokens flushed at a time when ``group`` is set; a flushed block fetches all its pages). The last page of a head may
be partial; pages are zero-padded in the cold tier. No custom kernels: selected pages are gathered and attended
with PyTorch.
"""

from __future__ import annotations

import torch

from kvsqueeze.core.attention_math import partial_attention
from kvsqueeze.core.storage import KVBlock
from kvsqueeze.core.tiers import ColdStore, paginate, unpaginate
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.retrieval.base import RetrievalCodec, top_pages
from kvsqueeze.spec import register

SUMMARY_LEVELS = 254  # code steps spanning a head's channel range; one more (255) is headroom for rounding up


def quantize_summaries(kmin: torch.Tensor, kmax: torch.Tensor, empty: torch.Tensor):
    """8-bit page summaries that still bound every key: codes ``uint8 [B, H, P, D]`` of the minima (rounded down) and
    maxima (rounded up) on a per-(row, head, channel) grid ``lo + code * step`` (``lo``, ``step`` ``[B, H, 1, D]``,
    float32; empty pages ``[B, H, P, 1]`` do not widen the range)."""
    lo32, hi32 = kmin.float().masked_fill(empty, float("inf")), kmax.float().masked_fill(empty, float("-inf"))
    lo = lo32.amin(2, keepdim=True)
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi = torch.maximum(hi32.amax(2, keepdim=True), lo)
    step = ((hi - lo) / SUMMARY_LEVELS).clamp(min=torch.finfo(torch.float32).tiny)
    cmax = ((kmax.float() - lo) / step).ceil().clamp(0, 255)
    cmax = torch.where(lo + cmax * step < kmax.float(), cmax + 1, cmax).clamp(0, 255)  # float rounding: stay above
    cmin = ((kmin.float() - lo) / step).floor().clamp(0, 255)
    cmin = torch.where(lo + cmin * step > kmin.float(), cmin - 1, cmin).clamp(0, 255)
    return cmin.to(torch.uint8), cmax.to(torch.uint8), lo.contiguous(), step.contiguous()


class QuestBlock(KVBlock):
    """Hot ``kmin/kmax [B, H, P, D]`` (the model's dtype, or ``uint8`` codes with ``lo``/``step [B, H, 1, D]``) and
    ``counts [B, H, P]``; keys/values ``[B, H, P, page, D]`` cold."""

    def __init__(self, kmin, kmax, counts, store: ColdStore, lengths, pages_per_step: int, dim: int,
                 per_token: bool = True, lo=None, step=None):  # fmt: skip
        self.kmin, self.kmax, self.counts, self.store = kmin, kmax, counts, store
        self.lengths, self.pages_per_step, self.dim = lengths.cpu(), pages_per_step, dim
        self.per_token, self.lo, self.step = per_token, lo, step
        self.page = store.arrays["k"].shape[3] if "k" in store.arrays else store.maps["k"][2][3]

    def summaries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Page minima and maxima ``[B, H, P, D]`` as float32 (decoded from the codes when quantized)."""
        if self.lo is None:
            return self.kmin.float(), self.kmax.float()
        return self.lo + self.kmin.float() * self.step, self.lo + self.kmax.float() * self.step

    def bounds(self, q: torch.Tensor) -> torch.Tensor:
        """Upper bound of ``q·k`` over every page's keys: ``[B, H, M, P]`` for grouped queries ``q [B, H, M, D]``."""
        qf = q.float()
        kmin, kmax = self.summaries()
        return qf.clamp(min=0) @ kmax.transpose(-1, -2) + qf.clamp(max=0) @ kmin.transpose(-1, -2)

    def select(self, q: torch.Tensor, tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages fetched for grouped queries ``q [B, H, G * tokens, D]`` (query head major, as ``CompressedLayer``
        groups them): indices ``[B, H, tokens, k]`` (each token's top-k of the largest bound over the head's query
        heads; ``tokens=1``: one selection for all rows) and whether each is a real page."""
        B, H, R, _ = q.shape
        bound = self.bounds(q).view(B, H, R // tokens, tokens, -1).amax(2)  # [B, H, tokens, P]
        return top_pages(bound.masked_fill((self.counts == 0)[:, :, None], float("-inf")), self.pages_per_step)

    def attend(self, q: torch.Tensor, scaling: float, tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, R, _ = q.shape
        index, ok = self.select(q, tokens)  # [B, H, T, k]
        T, k = index.shape[2:]
        P = self.counts.shape[-1]
        slot = torch.arange(self.page, device=q.device)
        if T * k <= P:  # each token's own pages (for one token: the paper's step)
            keys, values = self.store.take("k", index.flatten(2)), self.store.take("v", index.flatten(2))
            present = (slot < self.counts.gather(-1, index.flatten(2)).view(B, H, T, k)[..., None]) & ok[..., None]
            own = torch.eye(T, dtype=torch.bool, device=q.device)[None, None, :, :, None, None]
            mask = (own & present[:, :, None]).flatten(3)  # [B, H, T, T * k * page]: a token sees its pages only
        else:  # fewer pages in all than the tokens' selections: every page fetched once, each token masked
            keys, values = self.store.full("k"), self.store.full("v")
            chosen = torch.zeros(B, H, T, P, dtype=torch.bool, device=q.device).scatter(-1, index, ok)
            mask = (chosen[..., None] & (slot < self.counts[:, :, None, :, None])).flatten(3)
        mask = mask[:, :, None].expand(B, H, R // T, T, mask.shape[-1]).reshape(B, H, R, -1)
        return partial_attention(q, keys.flatten(2, 3).to(q.dtype), values.flatten(2, 3).to(q.dtype), scaling, mask)

    def attend_at(self, q: torch.Tensor, scaling: float, first_col: int, M: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by ``CompressedLayer`` with the forward's token count ``M``: per-token selection when asked."""
        return self.attend(q, scaling, M if self.per_token else 1)

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        counts = self.counts
        keys = unpaginate(self.store.full("k"), counts.to(self.kmin.device))
        values = unpaginate(self.store.full("v"), counts.to(self.kmin.device))
        return keys.to(dtype), values.to(dtype)


@register
class QuestCodec(RetrievalCodec):
    name = "quest"
    paper = "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference"
    arxiv = "2406.10774"

    page: int = 16
    select: str = "token"
    summary_bits: int = 0

    def check(self) -> None:
        super().check()
        if self.select not in ("token", "step"):
            raise KVSqueezeError(f"quest: unknown select={self.select!r}; use select=token or select=step")
        if self.summary_bits not in (0, 8):
            raise KVSqueezeError(f"quest: summary_bits must be 0 (the model's dtype) or 8, got {self.summary_bits}")

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        kp, counts = paginate(keys, lengths, self.page)
        vp, _ = paginate(values, lengths, self.page)
        present = (torch.arange(self.page, device=keys.device)[None, None, None, :] < counts[..., None])[..., None]
        empty = (counts == 0)[..., None]
        kmin = kp.masked_fill(~present, float("inf")).amin(3).masked_fill(empty, 0)
        kmax = kp.masked_fill(~present, float("-inf")).amax(3).masked_fill(empty, 0)
        P = counts.shape[-1]
        counts = counts.to(torch.int32)
        D = keys.shape[-1]
        unit = (D + values.shape[-1]) * keys.element_size()  # bytes of one full-cache token per head
        lo = step = None
        if self.summary_bits:
            kmin, kmax, lo, step = quantize_summaries(kmin, kmax, empty)
            summary = P * (2 * D + 4) + 2 * D * 4  # codes and counts per page, lo and step per channel
        else:
            summary = P * (2 * D * keys.element_size() + 4)
        overhead = summary / unit + self.residual
        fetch = self.fetch_tokens(ctx, overhead, self.page, "the page summaries and the window")
        pages = P if fetch is None else max(min(fetch // self.page, P), 1)
        store = self.store_for(keys.device)
        store.put("k", kp)
        store.put("v", vp)
        return QuestBlock(kmin.contiguous(), kmax.contiguous(), counts, store, lengths, pages, D,
                          self.select == "token", lo, step)  # fmt: skip
