"""The schedule axis: when a layer is compressed.

- ``prefill`` (default): compress once after the first forward pass.
- Decoding schedules (:class:`DecodingSchedule`): keep a layer inside ``budget`` tokens per KV head during
  generation by recompressing what it holds every ``every`` tokens. Between two forward passes a layer never
  holds more than ``budget + every - 1`` tokens per head. ``interval`` scores with the method's scorer;
  ``lazyeviction`` and ``triattention`` (in ``kvsqueeze.policies``) bring their own scoring rule.

A decoding schedule keeps per-layer bookkeeping in ``layer.state`` (aligned with the tokens the layer holds,
in chronological order, rows left-padded): ``pos [B, H, L]`` RoPE positions (-1 = padding), ``valid [B, L]``,
``q`` the last ``window`` queries, and whatever its scoring rule tracks. RoPE positions never shift.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import Component, register


class Schedule(Component):
    axis = "schedule"

    def due(self, layer, q_len: int) -> bool:
        """Whether ``layer`` should be compressed after the forward pass that just attended."""
        raise NotImplementedError


@register
class PrefillSchedule(Schedule):
    """Compress once, right after the first forward pass (the prompt or context prefill)."""

    name = "prefill"
    family = "schedule"
    paper = "one-shot compression after prefill (default)"

    def due(self, layer, q_len: int) -> bool:
        return not layer.compressed


# ---- helpers shared by decoding schedules ------------------------------------------------------------
def pack_left(x: torch.Tensor, keep: torch.Tensor, fill=0) -> torch.Tensor:
    """Gather ``x [B, H, L, ...]`` where ``keep [B, H, L]`` into ``[B, H, K, ...]``, rows left-padded with ``fill``.

    Every head of a row must keep the same count (uniform budgets); rows may differ (padding in a batch).
    """
    B, H, _ = keep.shape
    counts = keep.sum(-1)  # [B, H]
    if not bool((counts == counts[:, :1]).all()):
        raise KVSqueezeError("decoding schedules need the same kept count on every head; use the uniform budget")
    K = int(counts.max()) if counts.numel() else 0
    out = torch.full((B, H, K, *x.shape[3:]), fill, dtype=x.dtype, device=x.device)
    for b in range(B):
        k = int(counts[b, 0])
        if k:
            out[b, :, K - k :] = x[b][keep[b]].view(H, k, *x.shape[3:])
    return out


def held_tokens(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything ``layer`` holds, full precision: keys/values ``[B, H, L, D]`` and ``valid [B, L]`` (left-padded)."""
    tail_k, tail_v = layer.keys, layer.values
    B, H, T, D = tail_k.shape
    if not layer.blocks:
        valid = layer.state.get("valid")
        if valid is None or valid.shape[-1] != T:
            valid = torch.ones(B, T, dtype=torch.bool, device=tail_k.device)
        return tail_k, tail_v, valid
    per_row_k: list[list[torch.Tensor]] = [[[] for _ in range(H)] for _ in range(B)]
    per_row_v: list[list[torch.Tensor]] = [[[] for _ in range(H)] for _ in range(B)]
    for block in layer.blocks:
        k, v = block.materialize(tail_k.dtype)
        sizes = block.lengths.flatten().tolist()
        for i, (kh, vh) in enumerate(zip(k.split(sizes), v.split(sizes), strict=True)):
            b, h = divmod(i, H)
            per_row_k[b][h].append(kh)
            per_row_v[b][h].append(vh)
    counts = [sum(x.shape[0] for x in per_row_k[b][0]) + T for b in range(B)]
    L = max(counts)
    keys = tail_k.new_zeros(B, H, L, D)
    values = tail_v.new_zeros(B, H, L, tail_v.shape[-1])
    valid = torch.zeros(B, L, dtype=torch.bool, device=tail_k.device)
    for b in range(B):
        n = counts[b]
        valid[b, L - n :] = True
        for h in range(H):
            keys[b, h, L - n :] = torch.cat([*per_row_k[b][h], tail_k[b, h]])
            values[b, h, L - n :] = torch.cat([*per_row_v[b][h], tail_v[b, h]])
    return keys, values, valid


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


def per_kv_head(x: torch.Tensor, H: int) -> torch.Tensor:
    """Mean of ``[B, Hq, ...]`` over the query heads of each KV group: ``[B, H, ...]``."""
    B, Hq = x.shape[:2]
    return x.view(B, H, Hq // H, *x.shape[2:]).mean(2)


class DecodingSchedule(Schedule):
    """Recompress a layer to ``budget`` tokens per KV head whenever it holds ``budget + every`` of them.

    At a multi-token forward (the prompt) a layer holding more than ``budget`` tokens is compressed at once.
    ``budget`` falls back to ``CompressedCache(budget=…)``; ``window`` is how many recent queries are kept
    for observation-window scorers (SnapKV, TOVA …).
    """

    family = "schedule"
    aligned: ClassVar[tuple[str, ...]] = ("pos",)  # layer.state tensors [B, H, L]: one entry per held token
    every: int = Field(16, ge=1)
    budget: int | None = Field(None, ge=1)
    window: int = Field(32, ge=1)

    def due(self, layer, q_len: int) -> bool:  # the prefill path never sees decoding schedules
        return False

    # ---- hooks for subclasses -------------------------------------------------------------------
    def needs_attention(self, cache) -> bool:
        """Whether ``observe`` needs the attention of each new query over the held tokens."""
        return False

    def observe(self, cache, layer, new: dict) -> None:
        """Update per-token statistics in ``layer.state`` after a forward pass (before any eviction).

        ``new`` holds ``keys``/``valid`` (held tokens), ``queries`` (the pass's queries), ``positions``
        ``[B, M]`` of the new tokens, ``probs`` (``[B, Hq, M, L]`` or None), ``first`` (bool: the first
        pass of this layer, all held tokens are new) and ``module`` (the attention module).
        """

    def scores(self, cache, layer, ctx) -> torch.Tensor:
        """Scores ``[B, H, L]`` of the held tokens (higher = kept)."""
        raise NotImplementedError

    def lag(self) -> int:
        """New tokens a layer takes in between two recompressions."""
        return self.every

    def protected_recent(self) -> int:
        """Most recent tokens every recompression keeps regardless of scores."""
        return 0

    # ---- the step -------------------------------------------------------------------------------
    def resolve_budget(self, cache) -> int:
        budget = self.budget if self.budget is not None else cache.budget
        if budget is None:
            raise KVSqueezeError(
                f"{self.name} needs a token budget: write {self.name}:budget=256 or pass CompressedCache(budget=…)"
            )
        if self.protected_recent() >= budget:
            raise KVSqueezeError(f"{self.name}: budget {budget} must exceed its protected recent window")
        return budget

    def decode_step(self, cache, layer, module, queries, attention_mask, scaling, position_ids) -> None:
        """Called by the attention function after every forward pass of a layer under this schedule."""
        budget = self.resolve_budget(cache)
        state = layer.state
        B, M = queries.shape[0], queries.shape[2]
        first = "pos" not in state
        keys, values, valid = held_tokens(layer)
        H, L = keys.shape[1], keys.shape[2]
        if first:
            valid = cache._valid_tokens(attention_mask, B, L, keys.device)
        elif not layer.blocks:
            ones = torch.ones(B, M, dtype=torch.bool, device=keys.device)
            valid = torch.cat([state["valid"], ones], dim=-1)[:, -L:]
        if position_ids is None:
            new_pos = torch.arange(layer.seen - M, layer.seen, device=keys.device)[None].expand(B, M)
        else:
            new_pos = position_ids.expand(B, -1)[:, -M:].to(keys.device)
        if first:
            if position_ids is not None and position_ids.shape[-1] >= L:
                pos_all = position_ids.expand(B, -1)[:, -L:].to(keys.device)
            else:
                pos_all = torch.arange(L, device=keys.device)[None].expand(B, L)
            state["pos"] = pos_all.masked_fill(~valid, -1)[:, None].expand(B, H, L).clone()
        else:
            state["pos"] = torch.cat([state["pos"], new_pos[:, None].expand(B, H, M)], dim=-1)
        state["valid"] = valid
        old_q = state.get("q")
        q = queries if old_q is None or old_q.shape[0] != B else torch.cat([old_q, queries], dim=2)
        state["q"] = q[:, :, -self.window :].detach()
        probs = new_query_probs(keys, valid, queries, scaling) if self.needs_attention(cache) else None
        new = dict(keys=keys, valid=valid, queries=queries, positions=new_pos, probs=probs, first=first, module=module)
        self.observe(cache, layer, new)
        held = int(valid.sum(-1).max())
        if held >= budget + self.lag() or (M > 1 and held > budget):
            self.recompress(cache, layer, keys, values, valid, budget, scaling)

    def recompress(self, cache, layer, keys, values, valid, budget: int, scaling: float) -> None:
        """Score, select ``budget`` tokens per head, store them; realign the per-token state."""
        from kvsqueeze.policies.base import LayerContext, select, tokens_to_keep

        B, H, L, _ = keys.shape
        keep = tokens_to_keep(valid.sum(-1).cpu(), None, budget).to(keys.device)
        ctx = LayerContext(
            layer_idx=layer.layer_idx,
            num_layers=cache.num_layers,
            keys=keys,
            values=values,
            queries=layer.state["q"],
            valid=valid,
            scaling=scaling,
            positions=layer.state["pos"][:, 0],
            keep=keep,
            state=layer.state,
        )
        scores = self.scores(cache, layer, ctx).float()
        recent = self.protected_recent()
        if recent:
            rank_from_end = valid.long().flip(-1).cumsum(-1).flip(-1)
            scores = scores.masked_fill((valid & (rank_from_end <= recent))[:, None, :], math.inf)
        counts = cache.method.budget.allocate(scores, keep, ctx)
        keep_mask = select(scores, counts, valid)
        merged = cache.method.scorer.merge(ctx, keep_mask) if cache.method.evicts else None
        layer.keys, layer.values = merged if merged is not None else (keys, values)
        layer.blocks, layer.n_front = [], 0
        for name in self.aligned:
            if name in layer.state:
                layer.state[name] = pack_left(layer.state[name], keep_mask, -1 if name == "pos" else 0)
        kept_valid = pack_left(valid[:, None, :].expand(B, H, L), keep_mask, False)[:, 0]
        layer.state["valid"] = kept_valid
        cache._store(layer, keep_mask, ctx)
        if layer.n_front:  # dense uniform storage: rows are full, nothing is padding
            layer.state["valid"] = torch.ones_like(kept_valid)


@register
class IntervalSchedule(DecodingSchedule):
    """Compress to a fixed budget every ``every`` generated tokens, with the method's scorer.

    Scorers that need only recent queries (SnapKV, TOVA, Knorm, KeyDiff, StreamingLLM …) see the last
    ``window`` queries. H2O gets the paper's decoding statistic: attention accumulated by every query since
    the prompt (tracked incrementally), with its recent window protected.
    """

    name = "interval"
    aligned: ClassVar[tuple[str, ...]] = ("pos", "acc")
    paper = "decoding-time recompression every N tokens (DecodingPress-style; H2O's greedy decode eviction)"

    def _is_h2o(self, cache) -> bool:
        from kvsqueeze.policies.h2o import H2O

        return isinstance(cache.method.scorer, H2O)

    def needs_attention(self, cache) -> bool:
        return self._is_h2o(cache)

    def observe(self, cache, layer, new: dict) -> None:
        if not self._is_h2o(cache):
            return
        H = new["keys"].shape[1]
        gained = per_kv_head(new["probs"].sum(2), H)  # [B, H, L]
        acc = layer.state.get("acc")
        if acc is None or new["first"]:
            layer.state["acc"] = gained
        else:
            pad = gained.shape[-1] - acc.shape[-1]
            layer.state["acc"] = torch.nn.functional.pad(acc, (0, pad)) + gained

    def scores(self, cache, layer, ctx) -> torch.Tensor:
        if not cache.method.evicts:
            raise KVSqueezeError("interval needs a scorer: write e.g. 'h2o+interval:every=16,budget=256'")
        if not self._is_h2o(cache):
            return cache.method.scorer.score(ctx)
        from kvsqueeze.policies.base import PROTECTED

        score = layer.state["acc"].clone()
        fraction = cache.method.scorer.recent_fraction
        if fraction > 0:
            rank_from_end = ctx.valid.long().flip(-1).cumsum(-1).flip(-1)
            recent = (ctx.keep.float() * fraction).floor().long()
            score = score.masked_fill((ctx.valid & (rank_from_end <= recent[:, None]))[:, None, :], PROTECTED)
        return score
