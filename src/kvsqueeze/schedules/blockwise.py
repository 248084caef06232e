"""``blockwise``: block-wise prefill — a long context fed ``block`` tokens at a time, each layer recompressed to its
budget after every block, so the cache never holds more than ``budget + block`` tokens per head during the prefill
(EpiCache's block-wise prefill, "EpiCache: Episodic KV Cache Management for Long Conversational Question
Answering", Kim et al., arXiv 2509.17396).

The schedule is a :class:`~kvsqueeze.schedules.base.DecodingSchedule` (the same bookkeeping and the same
``recompress`` through the one pipeline as ``interval``) whose lag is one block; :func:`prefill_blocks` is the driver
that feeds a context block by block. With ``cache.shared_state[DEFERRED]`` set, the forward passes only append and
a caller recompresses when it chooses (:meth:`BlockwiseSchedule.flush`): EpiCache first runs its episode's
patched prompt after the block to obtain the queries that score it.

Example: ``snapkv+blockwise:budget=512,block=256`` with ``prefill_blocks(model, cache, ids, 256)``: SnapKV ranks
each block with that block's last ``window`` queries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field

from kvsqueeze.core.compat import with_cache
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.schedules.base import CacheView
from kvsqueeze.schedules.interval import IntervalSchedule
from kvsqueeze.spec import register

DEFERRED = "blockwise.deferred"  # shared_state key: forwards only append; the caller recompresses with flush()
NEVER = 1 << 60  # the budget a deferred layer reports: no forward recompresses it


@register
class BlockwiseSchedule(IntervalSchedule):
    name = "blockwise"
    paper = "EpiCache: Episodic KV Cache Management for Long Conversational Question Answering (block-wise prefill)"
    arxiv = "2509.17396"
    block: int = Field(256, ge=1)

    def lag(self) -> int:
        return self.block

    def resolve_budget(self, cache: CacheView, seen: int) -> int:
        if cache.shared_state.get(DEFERRED):
            return NEVER
        return super().resolve_budget(cache, seen)

    def flush(self, cache, budgets: list[int], queries: dict[int, torch.Tensor], scaling: dict[int, float]) -> None:
        """Recompress every layer holding more than ``budgets[layer]`` tokens per head, scored with ``queries[layer]``
        (``[B, Hq, P, D]``, e.g. a patched prompt's queries placed after the held tokens)."""
        for layer in cache.layers:
            idx = getattr(layer, "layer_idx", None)
            if idx is None or "valid" not in layer.state:
                continue
            keys, values, _ = layer.held()
            if keys.shape[2] <= budgets[idx]:
                continue
            layer.state["q"] = queries[idx]
            self.recompress(cache, layer, keys, values, layer.state["valid"], budgets[idx], scaling[idx])
            layer.state.pop("q", None)  # the scoring queries are not part of what the cache keeps


def prefill_blocks(
    model,
    cache,
    input_ids: torch.Tensor,
    block: int,
    after_block: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Feed ``input_ids [B, L]`` through ``cache`` ``block`` tokens at a time (positions continue); call
    ``after_block(start, end)`` after each block. Returns the last position's logits ``[B, 1, V]``."""
    if block < 1:
        raise KVSqueezeError(f"block must be >= 1 token, got {block}")
    if input_ids.dim() != 2 or input_ids.shape[-1] == 0:
        raise KVSqueezeError("prefill_blocks needs token ids of shape [batch, length] with length >= 1")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    logits = None
    held = cache.get_seq_length()
    for start in range(0, input_ids.shape[-1], block):
        end = min(start + block, input_ids.shape[-1])
        with torch.no_grad():
            logits = model(input_ids=input_ids[:, start:end], **with_cache(model, cache), use_cache=True,
                           logits_to_keep=1).logits  # fmt: skip
        if after_block is not None:
            after_block(start, end)
    if cache.tokens is None and held == 0:
        cache.tokens = input_ids.detach().cpu()
    return logits
