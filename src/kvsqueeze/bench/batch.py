"""Decode many compressed caches of one sample in one batched forward pass.

Every cell of a sample (each method × ratio) holds its own :class:`~kvsqueeze.core.cache.CompressedCache`, but they
all follow the same prompt and take the same number of new tokens per step, so their logical lengths (and RoPE
positions) are equal. :class:`BatchedCaches` stacks them as the rows of one batch: the model's linear layers —
nearly all of a small model's decode time on a CPU — run once for every row, and attention runs row by row over
each row's own cache through the documented binding (:class:`RowsBinding`, one
:class:`~kvsqueeze.core.cache.LayerBinding` per row). A row's result equals running its cache alone
(``tests/bench/test_batch.py``), up to floating-point summation order in the batched matrix products.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import Cache

from kvsqueeze.bench.capture import Decoded
from kvsqueeze.core import binding
from kvsqueeze.core.cache import CompressedCache, LayerBinding
from kvsqueeze.core.compat import with_cache
from kvsqueeze.core.layer import CompressedLayer


class RowsBinding:
    """One attention call of layer ``layer_idx`` for a batch whose row ``i`` lives in ``caches[i]``."""

    def __init__(self, caches: list[CompressedCache], layer_idx: int, rows: list[tuple[torch.Tensor, torch.Tensor]]):
        self.caches, self.layer_idx, self.rows = caches, layer_idx, rows

    def attend(self, inner, module, query, key, value, attention_mask, **kwargs):
        outs = []
        for i, (cache, (k, v)) in enumerate(zip(self.caches, self.rows, strict=True)):
            mask = attention_mask
            if isinstance(mask, torch.Tensor):
                mask = mask[i : i + 1] if mask.shape[0] > 1 else mask
                mask = (
                    mask[..., -k.shape[-2] :] if not isinstance(cache.layers[self.layer_idx], CompressedLayer) else mask
                )
            out, _ = LayerBinding(cache, self.layer_idx).attend(inner, module, query[i : i + 1], k, v, mask, **kwargs)
            outs.append(out)
        return torch.cat(outs, dim=0), None


class BatchedCaches(Cache):
    """Row ``i`` of the batch lives in ``caches[i]``; every row holds the same logical length. Masks are sized by a
    row whose layers are all kvsqueeze layers (logical lengths); rows with transformers' own sliding-window layers
    (method ``none``) see the mask's last columns."""

    def __init__(self, caches: list[CompressedCache]):
        lengths = {c.get_seq_length() for c in caches}
        if len(lengths) != 1:
            raise ValueError(f"batched caches must hold the same logical length, got {sorted(lengths)}")
        sizer = next((c for c in caches if all(isinstance(x, CompressedLayer) for x in c.layers)), caches[0])
        super().__init__(layers=sizer.layers)
        self.caches = caches

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        rows = [
            cache.layers[layer_idx].update(key_states[i : i + 1], value_states[i : i + 1])
            for i, cache in enumerate(self.caches)
        ]
        binding.bind(RowsBinding(self.caches, layer_idx, rows))
        return key_states, value_states  # placeholders: the binding attends over each row's own storage


@torch.no_grad()
def forward_many(model, caches: list[CompressedCache], ids: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """Append ``ids`` (``[1, n]`` for every row, or ``[B, n]``) to every cache; logits ``[B, n or keep, V]``."""
    B = len(caches)
    ids = (ids.expand(B, -1) if ids.shape[0] == 1 else ids).to(model.device)
    past = caches[0].get_seq_length()
    out = model(
        input_ids=ids,
        attention_mask=torch.ones(B, past + ids.shape[-1], dtype=torch.long, device=model.device),
        **with_cache(model, BatchedCaches(caches)),
        use_cache=True,
        logits_to_keep=keep,
    )
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
