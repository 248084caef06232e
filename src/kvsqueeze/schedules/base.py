"""The schedule axis: when a layer is compressed, and to what budget.

- ``prefill`` (default): compress once, right after the layer's first forward pass.
- Decoding schedules (:class:`DecodingSchedule`): keep a layer inside ``budget`` tokens per KV head during
  generation by recompressing what it holds every ``every`` tokens. Between two forward passes a layer never holds
  more than ``budget + every - 1`` tokens per head.

Every schedule compresses through the one pipeline (:func:`kvsqueeze.core.compressor.compress`). Statistics gathered
while decoding (H2O's accumulated attention, LazyEviction's recurrence, TriAttention's query centres) live in the
method's own module behind one hook, ``observe(state, step)``: the *tracker* of a schedule is the method's scorer
(``interval``) or the decoding method itself (``lazyeviction``, ``triattention``).

Per-layer bookkeeping lives in ``layer.state`` (aligned with the tokens the layer holds, in chronological order,
rows left-padded): ``pos [B, H, L]`` RoPE positions (-1 = padding), ``valid [B, L]``, ``q`` the last ``window``
queries, and whatever the tracker keeps (names listed in ``state["aligned"]`` are gathered with every eviction).
RoPE positions never shift.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from pydantic import Field

from kvsqueeze.core.compressor import aligned, attention_context, compress, compress_oldest
from kvsqueeze.core.context import SCRATCH, AttentionCall, DecodeStep, LayerContext
from kvsqueeze.core.layer import CompressedLayer
from kvsqueeze.core.masks import valid_tokens
from kvsqueeze.core.storage import owned
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policies.base import Scorer, tokens_to_keep
from kvsqueeze.schedules.rerotate import rerotate_kept, rope_of
from kvsqueeze.spec import Component, register


class CacheView(Protocol):
    """What a schedule reads from the cache it serves."""

    method: object
    ratio: float | None
    budget: int | None
    num_layers: int
    shared_state: dict

    def layer_ratio(self, layer_idx: int) -> float | None: ...

    def served_model(self): ...

    @property
    def compresses(self) -> bool: ...


class Schedule(Component):
    axis = "schedule"

    def after_attention(self, cache: CacheView, layer: CompressedLayer, call: AttentionCall) -> None:
        """Called after every attention call of ``layer`` (its storage already holds the new tokens)."""
        raise NotImplementedError


@register
class PrefillSchedule(Schedule):
    """Compress once, right after the first forward pass (the prompt or context prefill)."""

    name = "prefill"
    family = "schedule"
    paper = "one-shot compression after prefill (default)"
    rerotate: bool = False  # kvpress' key re-rotation: kept keys move to positions 0..k-1 (see schedules.rerotate)

    def after_attention(self, cache: CacheView, layer: CompressedLayer, call: AttentionCall) -> None:
        if layer.compressed and self.rerotate and not layer.state.get("positions_checked"):
            check_continued_positions(layer, call)
        if not cache.compresses:
            return
        scorer = cache.method.scorer if cache.method.evicts else None
        if scorer is not None and scorer.whole_context:
            self.whole_context(cache, scorer, layer, call)
        elif not layer.compressed:
            self.compress_now(cache, layer, call)

    def whole_context(self, cache: CacheView, scorer: Scorer, layer: CompressedLayer, call: AttentionCall) -> None:
        """Wait until the last layer has attended, then prepare and compress every layer that asked: everything an
        uncompressed layer holds, or the oldest ``scorer.span`` tail tokens of a layer (chunked prefill, decoding)."""
        span = scorer.span(cache, layer)
        if (span is None and not layer.compressed) or span:
            if span and self.rerotate:
                raise KVSqueezeError(f"prefill:rerotate does not compose with {scorer.name}'s later compressions")
            waiting = cache.shared_state.setdefault(WAITING, {})
            if span:  # the span's real tokens, not the call (the chunk's queries and mask): memory stays bounded
                valid = valid_tokens(call.attention_mask, call.queries.shape[0], layer.n_recent, layer.keys.device)
                parked = (valid[:, :span], call.scaling)
            else:
                queries = owned(
                    call.queries[:, :, -WAITING_QUERIES:]
                )  # a copy: a view would pin every query of the prompt
                parked = AttentionCall(call.module, queries, call.attention_mask, call.scaling, call.position_ids)
            waiting[layer.layer_idx] = (layer, parked, span)
        if layer.layer_idx != cache.num_layers - 1 or WAITING not in cache.shared_state:
            return
        waiting = cache.shared_state.pop(WAITING)
        scorer.prepare(cache)
        for idx in sorted(waiting):
            parked_layer, parked, parked_span = waiting[idx]
            if parked_span is None:
                self.compress_now(cache, parked_layer, parked)
            else:
                compress_oldest_now(cache, parked_layer, *parked, parked_span)
        cache.shared_state.pop(SCRATCH, None)

    def compress_now(self, cache: CacheView, layer: CompressedLayer, call: AttentionCall) -> None:
        rekey = None
        if self.rerotate:
            model = cache.served_model()
            rope = rope_of(model)
            rekey = lambda keys, keep, ctx: rerotate_kept(keys, keep, ctx, rope, cache.shared_state)  # noqa: E731
        compress_now(cache, layer, call, rekey)
        if self.rerotate:  # the layer's length is what it keeps: later tokens take the next positions
            kept = int(layer.kept_lengths().max())
            layer.shift, layer.seen = layer.seen - kept, kept


def check_continued_positions(layer: CompressedLayer, call: AttentionCall) -> None:
    """The first forward after a re-rotation must continue at the kept count (one check per layer)."""
    layer.state["positions_checked"] = True
    if call.position_ids is None:
        return
    first = int(call.position_ids.flatten()[0])
    expected = layer.seen - call.queries.shape[2]
    if first != expected:
        raise KVSqueezeError(
            f"prefill:rerotate moved the kept keys to positions 0..{expected - 1} but this forward continues at "
            f"{first} (model.generate over a prompt it compressed itself does not follow shifted positions); compress "
            "the context with cache.prefill(model, ids) or kvsqueeze.pipeline, then continue from it"
        )


WAITING = "waiting"  # shared_state key: layers a whole-context scorer has not compressed yet, with their calls
WAITING_QUERIES = 64  # newest prefill queries kept per waiting layer (not the whole prompt's)


def compress_now(cache: CacheView, layer: CompressedLayer, call: AttentionCall, rekey=None) -> None:
    """Compress everything ``layer`` holds after ``call`` (its prefill attention) through the one pipeline."""
    ctx = attention_context(
        layer, call.queries, call.attention_mask, call.scaling, call.position_ids,
        num_layers=cache.num_layers, shared=cache.shared_state, ratio=cache.layer_ratio(layer.layer_idx),
        budget=cache.budget, tokens=getattr(cache, "tokens", None), tokenizer=getattr(cache, "tokenizer", None),
    )  # fmt: skip
    compress(layer, ctx, cache.method, rekey=rekey)


def compress_oldest_now(cache: CacheView, layer: CompressedLayer, valid: torch.Tensor, scaling: float, span: int):
    """Compress the oldest ``span`` uncompressed tail tokens of ``layer`` (``valid [B, span]``: their real tokens)
    through the one pipeline (no queries: a scorer that compresses spans scores tokens by themselves)."""
    keys = layer.keys[..., layer.n_front : layer.n_front + span, :]
    values = layer.values[..., layer.n_front : layer.n_front + span, :]
    ctx = LayerContext(
        layer_idx=layer.layer_idx,
        num_layers=cache.num_layers,
        keys=keys,
        values=values,
        queries=None,
        valid=valid,
        scaling=scaling,
        keep=tokens_to_keep(valid.sum(-1), cache.layer_ratio(layer.layer_idx), cache.budget),
        state=layer.state,
        shared=cache.shared_state,
    )
    compress_oldest(layer, ctx, cache.method)


# ---- helpers shared by decoding schedules -----------------------------------------------------------------------
def new_query_probs(keys: torch.Tensor, valid: torch.Tensor, queries: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal softmax attention ``[B, Hq, M, L]`` of the ``M`` newest tokens' queries over the held keys.

    The queries belong to the last ``M`` held tokens (query ``i`` sees held tokens up to ``L - M + i``).
    """
    H, L = keys.shape[1], keys.shape[2]
    Hq, M = queries.shape[1], queries.shape[2]
    k = keys.repeat_interleave(Hq // H, dim=1)
    logits = torch.matmul(queries, k.transpose(-1, -2)).float() * scaling
    visible = torch.arange(L, device=keys.device)[None, :] <= torch.arange(L - M, L, device=keys.device)[:, None]
    visible = visible[None, None] & valid[:, None, None, :]
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)


def protect_recent(scores: torch.Tensor, valid: torch.Tensor, recent: torch.Tensor | int) -> torch.Tensor:
    """``scores [B, H, L]`` with the ``recent`` newest real tokens of each row (an int or ``[B]``) set to +inf."""
    rank_from_end = valid.long().flip(-1).cumsum(-1).flip(-1)  # 1 = the newest real token
    limit = recent[:, None] if isinstance(recent, torch.Tensor) else recent
    return scores.masked_fill((valid & (rank_from_end <= limit))[:, None, :], math.inf)


class DecodingSchedule(Schedule):
    """Recompress a layer to ``budget`` tokens per KV head whenever it holds ``budget + every`` of them.

    At a multi-token forward (the prompt) a layer holding more than ``budget`` tokens is compressed at once.
    ``budget`` falls back to ``CompressedCache(budget=…)``. Instead of a budget, ``ratio`` (or
    ``CompressedCache(ratio=…)``) keeps ``ceil((1 - ratio) × tokens seen)`` per head: a budget that grows with
    the sequence (kvpress' DecodingPress compression ratio). ``window`` is how many recent queries are kept for
    observation-window scorers (SnapKV, TOVA …).
    """

    family = "schedule"
    every: int = Field(16, ge=1)
    budget: int | None = Field(None, ge=1)
    ratio: float | None = Field(None, ge=0.0, lt=1.0)
    window: int = Field(32, ge=1)

    # ---- what subclasses choose --------------------------------------------------------------------------------
    def tracker(self, cache: CacheView):
        """The object whose ``observe(state, step)`` gathers decoding statistics (None: no statistics)."""
        return None

    def scorer(self, cache: CacheView) -> Scorer:
        """The scorer each recompression ranks held tokens with."""
        raise NotImplementedError

    def lag(self) -> int:
        """New tokens a layer takes in between two recompressions."""
        return self.every

    def protected_recent(self) -> int:
        """Most recent tokens every recompression keeps regardless of scores."""
        return 0

    # ---- the step ----------------------------------------------------------------------------------------------
    def resolve_budget(self, cache: CacheView, seen: int) -> int:
        """Tokens kept per head after a recompression, for a layer that has seen ``seen`` tokens."""
        budget = self.budget if self.budget is not None else cache.budget
        ratio = self.ratio if self.ratio is not None else cache.ratio
        if budget is None and ratio is not None:  # never below the protected window
            budget = max(math.ceil(seen * (1.0 - ratio) - 1e-9), self.protected_recent() + 1)
        if budget is None:
            raise KVSqueezeError(
                f"{self.name} needs a token budget or a ratio: write {self.name}:budget=256 (or :ratio=0.5) or pass "
                "CompressedCache(budget=…)"
            )
        if self.protected_recent() >= budget:
            raise KVSqueezeError(f"{self.name}: budget {budget} must exceed its protected recent window")
        return budget

    def after_attention(self, cache: CacheView, layer: CompressedLayer, call: AttentionCall) -> None:
        budget = self.resolve_budget(cache, layer.seen)
        state = layer.state
        queries = call.queries
        B, M = queries.shape[0], queries.shape[2]
        first = "pos" not in state
        keys, values, valid = layer.held()
        H, L = keys.shape[1], keys.shape[2]
        if first:
            valid = valid_tokens(call.attention_mask, B, L, keys.device)
        elif not layer.blocks:
            ones = torch.ones(B, M, dtype=torch.bool, device=keys.device)
            valid = torch.cat([state["valid"], ones], dim=-1)[:, -L:]
        if call.position_ids is None:
            new_pos = torch.arange(layer.seen - M, layer.seen, device=keys.device)[None].expand(B, M)
        else:
            new_pos = call.position_ids.expand(B, -1)[:, -M:].to(keys.device)
        if first:
            if call.position_ids is not None and call.position_ids.shape[-1] >= L:
                pos_all = call.position_ids.expand(B, -1)[:, -L:].to(keys.device)
            else:
                pos_all = torch.arange(L, device=keys.device)[None].expand(B, L)
            state["pos"] = pos_all.masked_fill(~valid, -1)[:, None].expand(B, H, L).clone()
            aligned(state, "pos")
            if layer.is_sliding:
                cols = torch.arange(layer.seen - L, layer.seen, device=keys.device, dtype=torch.int32)
                state["cols"] = cols[None, None].expand(B, H, L).clone()
                aligned(state, "cols")
        else:
            state["pos"] = torch.cat([state["pos"], new_pos[:, None].expand(B, H, M)], dim=-1)
            if layer.is_sliding:
                cols = torch.arange(layer.seen - M, layer.seen, device=keys.device, dtype=torch.int32)
                state["cols"] = torch.cat([state["cols"], cols[None, None].expand(B, H, M)], dim=-1)
        state["valid"] = valid
        old_q = state.get("q")
        q = queries if old_q is None or old_q.shape[0] != B else torch.cat([old_q, queries], dim=2)
        state["q"] = owned(q[:, :, -self.window :].detach())
        tracker = self.tracker(cache)
        if tracker is not None:
            probs = new_query_probs(keys, valid, queries, call.scaling) if tracker.needs_attention else None
            step = DecodeStep(keys, valid, queries, new_pos, probs, first, call.module)
            tracker.observe(state, step)
        held = L  # the longest row holds every slot (rows are left-padded)
        if held >= budget + self.lag() or (M > 1 and held > budget):
            self.recompress(cache, layer, keys, values, valid, budget, call.scaling)

    def recompress(self, cache: CacheView, layer, keys, values, valid, budget: int, scaling: float) -> None:
        """Select ``budget`` tokens per head of everything held, through the one compression pipeline."""
        ctx = LayerContext(
            layer_idx=layer.layer_idx,
            num_layers=cache.num_layers,
            keys=keys,
            values=values,
            queries=layer.state["q"],
            valid=valid,
            scaling=scaling,
            positions=layer.state["pos"][:, 0],
            keep=tokens_to_keep(valid.sum(-1), None, budget),
            state=layer.state,
            shared=cache.shared_state,
            sliding_window=layer.sliding_window,
        )
        scorer = RecentProtected(self.scorer(cache), self.protected_recent())
        keep = compress(layer, ctx, cache.method, scorer=scorer)
        counts = keep[:, 0].sum(-1)  # [B] kept per row (every head keeps as many); valid slots are left-packed
        K = int(counts.max()) if counts.numel() else 0
        layer.state["valid"] = torch.arange(K, device=keys.device)[None, :] >= (K - counts)[:, None]
        if layer.n_front:  # dense uniform storage: rows are full, nothing is padding
            layer.state["valid"] = torch.ones_like(layer.state["valid"])


class OwnRule:
    """Mixin for decoding methods that are their own tracker and scorer (LazyEviction, TriAttention): the parts of
    the scorer protocol they do not customise."""

    needs_attention = False

    def tracker(self, cache: CacheView):
        return self

    def scorer(self, cache: CacheView):
        return self

    def protected(self, length: int) -> int:
        return 0

    def counts(self, scores: torch.Tensor, keep_per_head: torch.Tensor, ctx: LayerContext) -> torch.Tensor | None:
        return None

    def merge(self, ctx: LayerContext, keep: torch.Tensor):
        return None


class RecentProtected:
    """A decoding schedule's scorer with its protected recent window (the newest real tokens kept regardless)."""

    def __init__(self, inner: Scorer, recent: int):
        self.inner, self.recent, self.name = inner, recent, inner.name

    def protected(self, length: int) -> int:
        return self.inner.protected(length)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        scores = self.inner.score(ctx).float()
        return protect_recent(scores, ctx.valid, self.recent) if self.recent else scores

    def counts(self, scores: torch.Tensor, keep_per_head: torch.Tensor, ctx: LayerContext) -> torch.Tensor | None:
        return self.inner.counts(scores, keep_per_head, ctx)

    def merge(self, ctx: LayerContext, keep: torch.Tensor):
        return self.inner.merge(ctx, keep)
