"""The one compression pipeline: scores → budgets → selection → merge → codec → storage.

:func:`compress` is the only code that turns what a layer holds into compressed storage. It is called by the live
prefill (through the attention binding), by the benchmark's captured build (the same attention inputs, recorded
once) and by every decoding schedule (what the layer holds, to a token budget); :func:`compress_oldest` runs the
same selection (:func:`choose`) over the oldest part of a layer's uncompressed tail only (Fast KVzip's chunked
prefill and decoding). Schedules decide *when* and *to what budget*; scorers, budgets and codecs decide *what* and
*how*.
"""

from __future__ import annotations

import torch

from kvsqueeze.core.context import SCRATCH, LayerContext
from kvsqueeze.core.layer import CompressedLayer
from kvsqueeze.core.masks import valid_tokens
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policies.base import Scorer, select, tokens_to_keep
from kvsqueeze.spec import Method

ALIGNED = "aligned"  # LayerContext.state[ALIGNED]: names of per-token state tensors [B, H, L] kept in step with storage


def attention_context(
    layer: CompressedLayer,
    queries: torch.Tensor,
    attention_mask,
    scaling: float,
    position_ids: torch.Tensor | None,
    *,
    num_layers: int,
    shared: dict,
    ratio: float | None,
    budget: int | None,
    tokens: torch.Tensor | None = None,
    tokenizer=None,
) -> LayerContext:
    """The context of compressing everything an uncompressed ``layer`` holds right after an attention call;
    ``tokens [B, L]``: the ids of the held tokens when known (kept only when they cover exactly what it holds)."""
    keys, values = layer.keys, layer.values
    B, L = keys.shape[0], keys.shape[2]
    valid = valid_tokens(attention_mask, B, L, keys.device)
    if layer.is_sliding:  # the next query sees only the last ``window - 1`` tokens
        cols = torch.arange(layer.seen - L, layer.seen, device=keys.device)
        valid = valid & (cols > layer.seen - layer.sliding_window)[None, :]
    positions = None if position_ids is None else position_ids.expand(B, -1)[:, -L:]
    return LayerContext(
        layer_idx=layer.layer_idx,
        num_layers=num_layers,
        keys=keys,
        values=values,
        queries=queries,
        valid=valid,
        scaling=scaling,
        positions=positions,
        keep=tokens_to_keep(valid.sum(-1), ratio, budget),
        state=layer.state,
        shared=shared,
        sliding_window=layer.sliding_window,
        tokens=tokens if tokens is not None and tuple(tokens.shape) == (B, L) else None,
        tokenizer=tokenizer,
    )


def compress(
    layer: CompressedLayer, ctx: LayerContext, method: Method, scorer: Scorer | None = None, rekey=None
) -> torch.Tensor:
    """Compress ``ctx.keys/values`` (everything ``layer`` holds, in order) into ``layer``'s storage; returns the keep
    mask ``[B, H, L]``.

    ``rekey(keys, keep, ctx) -> keys`` transforms the keys once the kept tokens are chosen, before the codec sees
    them (the prefill schedule's key re-rotation).
    ``scorer`` replaces the method's scorer (decoding schedules that bring their own rule); with neither (method
    ``none`` + a codec) every valid token is kept and encoded. Per-token state tensors named in
    ``ctx.state[ALIGNED]`` are gathered with the kept tokens (their rows must keep equal counts on every head).
    """
    scorer = scorer if scorer is not None else (method.scorer if method.evicts else None)
    B, H, L, _ = ctx.keys.shape
    keys, values = ctx.keys, ctx.values
    if scorer is not None:
        protected = scorer.protected(L)
        if layer.is_sliding:  # a window shorter than what the scorer protects: keep what the window holds
            ctx.keep = torch.maximum(ctx.keep, torch.clamp(ctx.valid.sum(-1), max=protected))
            protected = min(protected, int(ctx.valid.sum(-1).min()))
        smallest = int(ctx.keep.min())
        if smallest < protected:
            raise KVSqueezeError(
                f"{scorer.name} always keeps {protected} tokens but the budget is {smallest} per head; "
                "use a longer context, a smaller ratio or a larger budget"
            )
        keep = choose(ctx, method, scorer)
        merged = scorer.merge(ctx, keep)
        if merged is not None:
            keys, values = merged
    else:
        keep = ctx.valid[:, None, :].expand(B, H, L)
    if rekey is not None:
        keys = rekey(keys, keep, ctx)
    layer.store(keys, values, keep, ctx)
    realign(ctx.state, keep)
    if ctx.layer_idx == ctx.num_layers - 1:
        ctx.shared.pop(SCRATCH, None)
    return keep


def choose(ctx: LayerContext, method: Method, scorer: Scorer) -> torch.Tensor:
    """The keep mask ``[B, H, L]`` of ``ctx``'s tokens: scores, then counts (the scorer's or the budget's), then the
    top of each head."""
    scores = scorer.score(ctx)
    ctx.scores = scores
    counts = scorer.counts(scores, ctx.keep, ctx)  # head-aware selectors own their budgets
    if counts is None:
        counts = method.budget.allocate(scores, ctx.keep, ctx)
    return select(scores, counts, ctx.valid)


def compress_oldest(layer: CompressedLayer, ctx: LayerContext, method: Method) -> torch.Tensor:
    """Compress only the oldest ``ctx.length`` uncompressed tail tokens of ``layer`` (``ctx`` covers them; the newer
    ones stay): the same scores → counts → selection, stored by :meth:`CompressedLayer.store_oldest` (no merging).
    Returns the keep mask ``[B, H, ctx.length]``."""
    keep = choose(ctx, method, method.scorer)
    layer.store_oldest(ctx.length, keep, ctx)
    return keep


def aligned(state: dict, *names: str) -> None:
    """Declare per-token state tensors ``[B, H, L]`` that every eviction gathers with the kept tokens."""
    state[ALIGNED] = tuple(dict.fromkeys((*state.get(ALIGNED, ()), *names)))


def realign(state: dict, keep: torch.Tensor) -> None:
    """Gather the per-token state tensors named in ``state[ALIGNED]`` with ``keep [B, H, L]``, left-padded per row."""
    for name in state.get(ALIGNED, ()):
        if name in state and state[name].shape[-1] == keep.shape[-1]:
            state[name] = pack_left(state[name], keep, -1 if name in ("pos", "cols") else 0)


def pack_left(x: torch.Tensor, keep: torch.Tensor, fill=0) -> torch.Tensor:
    """Gather ``x [B, H, L, ...]`` where ``keep [B, H, L]`` into ``[B, H, K, ...]``, rows left-padded with ``fill``.

    Every head of a row must keep the same count (uniform budgets); rows may differ (padding in a batch).
    """
    B, H = keep.shape[:2]
    counts = keep.sum(-1)  # [B, H]
    if not bool((counts == counts[:, :1]).all()):
        raise KVSqueezeError("decoding schedules need the same kept count on every head; use the uniform budget")
    K = int(counts.max()) if counts.numel() else 0
    # rank of each kept token from the end of its row: the last kept token goes to slot K - 1
    rank_from_end = keep.flip(-1).long().cumsum(-1).flip(-1)  # [B, H, L]
    slot = (K - rank_from_end).clamp(min=0)
    out = torch.full((B, H, K, *x.shape[3:]), fill, dtype=x.dtype, device=x.device)
    b, h, t = keep.nonzero(as_tuple=True)
    source = x if x.shape[:3] == keep.shape else x.expand(B, H, *x.shape[2:])
    out[b, h, slot[b, h, t]] = source[b, h, t]
    return out
