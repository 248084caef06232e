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

Deviations: grouped-query attention selects pages per KV head by the largest bound over the head's query heads
(and query tokens of a multi-token forward); the paper selects per query head (no GQA). The first two layers are
not kept dense (the paper skips them). Tokens decoded after the prefill stay in the hot window (``group`` tokens
flushed at a time when ``group`` is set; a flushed block fetches all its pages). The last page of a head may be
partial; pages are zero-padded in the cold tier. No custom kernels: selected pages are gathered and attended with
PyTorch.
"""

from __future__ import annotations

import torch

from kvsqueeze.core.attention_math import partial_attention
from kvsqueeze.core.storage import KVBlock
from kvsqueeze.core.tiers import ColdStore, paginate, unpaginate
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.retrieval.base import RetrievalCodec, top_pages
from kvsqueeze.spec import register


class QuestBlock(KVBlock):
    """Hot ``kmin/kmax [B, H, P, D]`` and ``counts [B, H, P]``; keys/values ``[B, H, P, page, D]`` cold."""

    def __init__(self, kmin, kmax, counts, store: ColdStore, lengths, pages_per_step: int, dim: int):
        self.kmin, self.kmax, self.counts, self.store = kmin, kmax, counts, store
        self.lengths, self.pages_per_step, self.dim = lengths.cpu(), pages_per_step, dim
        self.page = store.arrays["k"].shape[3] if "k" in store.arrays else store.maps["k"][2][3]

    def bounds(self, q: torch.Tensor) -> torch.Tensor:
        """Upper bound of ``q·k`` over every page's keys: ``[B, H, M, P]`` for grouped queries ``q [B, H, M, D]``."""
        qf = q.float()
        return qf.clamp(min=0) @ self.kmax.float().transpose(-1, -2) + qf.clamp(max=0) @ self.kmin.float().transpose(
            -1, -2
        )

    def select(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages fetched for ``q``: indices ``[B, H, k]`` (top-k of the largest bound over the head's queries)
        and whether each is a real page."""
        score = self.bounds(q).amax(2).masked_fill(self.counts == 0, float("-inf"))
        return top_pages(score, self.pages_per_step)

    def attend(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        index, ok = self.select(q)
        keys, values = self.store.take("k", index), self.store.take("v", index)  # [B, H, k, page, D]
        counts = self.counts.gather(-1, index)
        present = (torch.arange(self.page, device=q.device)[None, None, None, :] < counts[..., None]) & ok[..., None]
        mask = present.flatten(2)[:, :, None, :]
        return partial_attention(q, keys.flatten(2, 3).to(q.dtype), values.flatten(2, 3).to(q.dtype), scaling, mask)

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

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        self.check()
        if self.page < 1:
            raise KVSqueezeError(f"quest: page must be >= 1 token, got {self.page}")
        kp, counts = paginate(keys, lengths, self.page)
        vp, _ = paginate(values, lengths, self.page)
        present = (torch.arange(self.page, device=keys.device)[None, None, None, :] < counts[..., None])[..., None]
        empty = (counts == 0)[..., None]
        kmin = kp.masked_fill(~present, float("inf")).amin(3).masked_fill(empty, 0)
        kmax = kp.masked_fill(~present, float("-inf")).amax(3).masked_fill(empty, 0)
        P = counts.shape[-1]
        counts = counts.to(torch.int32)
        unit = (keys.shape[-1] + values.shape[-1]) * keys.element_size()  # bytes of one full-cache token per head
        overhead = P * (2 * keys.shape[-1] * keys.element_size() + 4) / unit + self.residual
        fetch = self.fetch_tokens(ctx, overhead, self.page, "the page summaries and the window")
        pages = P if fetch is None else max(min(fetch // self.page, P), 1)
        store = self.store_for(keys.device)
        store.put("k", kp)
        store.put("v", vp)
        return QuestBlock(kmin.contiguous(), kmax.contiguous(), counts, store, lengths, pages, keys.shape[-1])
