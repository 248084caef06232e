"""Decode many compressed caches of one sample in one batched forward pass.

Every cell of a sample (each method × ratio) holds its own :class:`~kvsqueeze.cache.CompressedCache`, but they
all follow the same prompt and take the same number of new tokens per step, so their logical lengths (and RoPE
positions) are equal. :class:`BatchedCaches` stacks them as the rows of one batch: the model's linear layers —
nearly all of a small model's decode time on a CPU — run once for every row, and attention runs row by row over
each row's own cache through the ordinary kvsqueeze attention function. A row's result equals running its cache
alone (``tests/bench/test_batch.py``), up to floating-point summation order in the batched matrix products.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch
from transformers import Cache

from kvsqueeze.attention import NAME as KVSQUEEZE_ATTENTION
from kvsqueeze.attention import kvsqueeze_attention, register_attention
from kvsqueeze.bench.capture import Decoded
from kvsqueeze.cache import _ACTIVE, CompressedCache

BATCHED = "kvsqueeze_bench_batched"
_CURRENT = threading.local()


class BatchedCaches(Cache):
    """Row ``i`` of the batch lives in ``caches[i]``; lengths and masks are those of ``caches[0]`` (all equal)."""

    def __init__(self, caches: list[CompressedCache]):
        lengths = {c.get_seq_length() for c in caches}
        if len(lengths) != 1:
            raise ValueError(f"batched caches must hold the same logical length, got {sorted(lengths)}")
        super().__init__(layers=caches[0].layers)
        self.caches = caches
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        self.pending = [
            cache.update(key_states[i : i + 1], value_states[i : i + 1], layer_idx, *args, **kwargs)
            for i, cache in enumerate(self.caches)
        ]
        _CURRENT.batch = self
        return key_states, value_states  # placeholders: the attention function reads ``pending``


def _batched_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    batch: BatchedCaches = _CURRENT.batch
    outs = []
    for i, (cache, (k, v)) in enumerate(zip(batch.caches, batch.pending, strict=True)):
        _ACTIVE.cache = cache
        mask = attention_mask
        if mask is not None and mask.shape[0] > 1:
            mask = mask[i : i + 1]
        out, _ = kvsqueeze_attention(module, query[i : i + 1], k, v, mask, dropout=dropout, scaling=scaling, **kwargs)
        outs.append(out)
    batch.pending = []
    return torch.cat(outs, dim=0), None


@torch.no_grad()
def forward_many(model, caches: list[CompressedCache], ids: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """Append ``ids`` (``[1, n]`` for every row, or ``[B, n]``) to every cache; logits ``[B, n or keep, V]``."""
    register_attention(BATCHED, _batched_attention)
    B = len(caches)
    ids = (ids.expand(B, -1) if ids.shape[0] == 1 else ids).to(model.device)
    past = caches[0].get_seq_length()
    model.set_attn_implementation(BATCHED)
    try:
        out = model(
            input_ids=ids,
            attention_mask=torch.ones(B, past + ids.shape[-1], dtype=torch.long, device=model.device),
            past_key_values=BatchedCaches(caches),
            use_cache=True,
            logits_to_keep=keep,
        )
    finally:
        _CURRENT.batch = None
        model.set_attn_implementation(KVSQUEEZE_ATTENTION)
    return out.logits.float().cpu()


@torch.no_grad()
def greedy_many(
    model,
    caches: list[CompressedCache],
    first_logits: list[torch.Tensor],
    max_new_tokens: list[int],
    eos: set[int],
    stops: list[Callable[[list[int]], bool] | None] | None = None,
) -> list[Decoded]:
    """:func:`~kvsqueeze.bench.capture.greedy` for every row at once; finished rows leave the batch.

    ``seconds`` of each result is the wall time of the batched steps that row took part in (shared work).
    """
    n = len(caches)
    stops = stops or [None] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    logits = list(first_logits)
    seconds = [0.0] * n
    active = list(range(n))
    while active:
        going = []
        for i in active:
            tok = int(logits[i].argmax())
            tokens[i].append(tok)
            stop = stops[i]
            if tok in eos or len(tokens[i]) >= max_new_tokens[i] or (stop is not None and stop(tokens[i])):
                continue
            going.append(i)
        if not going:
            break
        start = time.perf_counter()
        out = forward_many(model, [caches[i] for i in going], torch.tensor([[tokens[i][-1]] for i in going]), keep=1)
        took = time.perf_counter() - start
        for row, i in enumerate(going):
            logits[i] = out[row, -1]
            seconds[i] += took
        active = going
    return [Decoded(t, [], s, len(t) - 1) for t, s in zip(tokens, seconds, strict=True)]
