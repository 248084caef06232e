"""The scorer and budget axes, and the selection step they share (what they see: :class:`LayerContext`).

Shapes: ``B`` batch, ``H`` KV heads, ``Hq`` query heads (``Hq = H * groups``), ``L`` tokens, ``D`` head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from kvsqueeze.core.context import LayerContext
from kvsqueeze.spec import Component

PROTECTED = float("inf")  # score of a token that must be kept (sinks, observation window)
PREFILL_MEMO = "prefill_memo"  # key of LayerContext.shared: work shared by caches built from one captured prefill


class ContextHost(Protocol):
    """What a whole-context scorer (:attr:`Scorer.whole_context`) may use of the cache it serves."""

    shared_state: dict
    ratio: float | None  # the cache's ratio (fraction removed) or None
    budget: int | None  # the cache's token budget per head or None
    lineage: object  # the same object for a cache and every fork of it
    tokens: torch.Tensor | None  # [B, L] token ids held, when known
    tokenizer: object | None
    num_layers: int
    layers: list  # the cache's layers (``compressed`` tells whether a layer holds compressed storage)
    replaying: bool  # inside replay(): a pass that leaves no trace

    def served_model(self): ...  # the model the cache was built for (held weakly; None once it is gone)

    def get_seq_length(self, layer_idx: int = 0) -> int: ...

    def replay(self, model, input_ids: torch.Tensor, observer: Callable) -> None: ...

    def keep_hook(self, handle) -> None: ...  # a hook handle removed when the cache is dropped

    def follow_tokens(self, model) -> None: ...  # record the token ids of every forward that extends the cache


class Scorer(Component):
    """Scores tokens; the highest-scoring ones are kept. ``PROTECTED`` marks tokens kept regardless.

    A *whole-context* scorer (``whole_context`` true: KVzip, Fast KVzip) needs every layer to have seen the context
    before any layer is compressed: the prefill schedule then waits for the last layer's attention, calls
    :meth:`prepare` (a second pass over the context, or gate scores gathered during the forward) and compresses
    every layer through the one pipeline. :meth:`attach` runs once when a cache is built for a model (hooks it
    needs during the forward, kept alive only as long as that cache).
    """

    axis = "scorer"

    @property
    def whole_context(self) -> bool:
        """Whether compression waits for the whole context (see the class docstring)."""
        return False

    def attach(self, host: ContextHost, model) -> None:
        """Called once when a cache is built for ``model`` (whole-context scorers that observe the forward)."""

    def prepare(self, host: ContextHost) -> None:
        """Work over the whole context after the last layer's prefill attention, before any layer is compressed."""

    def prefill_chunk(self, length: int) -> int | None:
        """Whole-context scorers that compress a long context as it is prefilled: the chunk length
        ``cache.prefill`` feeds a context of ``length`` tokens in (None, default: one forward)."""
        return None

    def span(self, host: ContextHost, layer) -> int | None:
        """Whole-context scorers that keep compressing as the sequence grows (Fast KVzip's chunked prefill and
        decoding): after ``layer``'s attention, how many of its oldest uncompressed tail tokens to compress now (0:
        none yet; the newer ones stay). None (default): compress everything an uncompressed layer holds at once."""
        return None

    def protected(self, length: int) -> int:
        """How many tokens this scorer always keeps (to validate budgets)."""
        return 0

    def score(self, ctx: LayerContext) -> torch.Tensor:  # [B, H, L]
        raise NotImplementedError

    def counts(self, scores: torch.Tensor, keep_per_head: torch.Tensor, ctx: LayerContext) -> torch.Tensor | None:
        """Head-aware selectors that fix each head's count themselves (RazorAttention) return counts ``[B, H]``
        here, overriding the budget axis; None (default) lets the budget component decide."""
        return None

    def merge(self, ctx: LayerContext, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Merging methods fold evicted tokens into kept ones: return new ``(keys, values) [B, H, L, D]`` whose
        kept positions are stored instead of the originals; None (default) stores the kept tokens as they are."""
        return None


class Budget(Component):
    """Splits each row's kept-token budget across the KV heads of a layer (and across layers)."""

    axis = "budget"

    def allocate(self, scores: torch.Tensor, keep_per_head: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """``keep_per_head [B]`` is the uniform per-head budget of each row; return counts ``[B, H]``."""
        raise NotImplementedError


def tokens_to_keep(valid_lengths: torch.Tensor, ratio: float | None, budget: int | None) -> torch.Tensor:
    """Per-row tokens kept per head: ``ceil(n * (1 - ratio))`` or ``min(budget, n)``; never below 1."""
    n = valid_lengths.to(torch.long)
    if budget is not None:
        keep = torch.clamp(n, max=budget)
    else:
        keep = torch.ceil(n.double() * (1.0 - (ratio or 0.0)) - 1e-9).long()
    return torch.clamp(keep, min=1)


def select(scores: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Keep mask ``[B, H, L]``: for each (row, head) the ``counts`` highest scores among valid tokens."""
    B, H, L = scores.shape
    scores = scores.float().masked_fill(~valid[:, None, :], float("-inf"))
    k_max = int(counts.max())
    if k_max >= L:
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    else:
        order = torch.topk(scores, k_max, dim=-1, sorted=True).indices
    rank_ok = torch.arange(order.shape[-1], device=scores.device)[None, None, :] < counts[..., None]
    keep = torch.zeros(B, H, L, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, order, rank_ok)
    return keep & valid[:, None, :]


def prefill_memo(ctx: LayerContext, name: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()``, computed once per layer when several caches are built from the same captured prefill.

    The benchmark (``kvsqueeze.bench.capture.build_cache``) puts one dict under ``ctx.shared[PREFILL_MEMO]`` while
    it builds each method's cache from one prefill; elsewhere this is just ``fn()``. Only for work that depends on
    the context tensors alone (not on the budget, the ratio or the layer's state); callers must not modify the
    returned tensor in place.
    """
    memo = ctx.shared.get(PREFILL_MEMO)
    if memo is None:
        return fn()
    key = (name, ctx.layer_idx, id(ctx.queries), ctx.length)  # the captured queries identify the prefill
    if key not in memo:
        memo[key] = fn()
    return memo[key]
