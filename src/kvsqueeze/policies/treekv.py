"""TreeKV — "TreeKV: Smooth Key-Value Cache Compression with Tree Structures" (He et al., arXiv 2501.04987).

A fixed-size cache of ``c`` tokens. Each time a token arrives at a full cache, one token is evicted from the
*eviction scope*: two adjacent cached tokens, the one with the lower (averaged) attention score goes. The scope
then moves one slot to the right and wraps to the front when it reaches the end of the cache. One sweep pairs
tokens (0,1), (2,3), … — a level of a binary tree — so older regions are halved again and again while recent
tokens stay dense: the kept set thins out smoothly from the recent end to the distant start.

Prefill: the prompt is replayed as if its tokens arrived one by one (the first ``c`` fill the cache, every later
one triggers one scoped eviction), vectorised over the KV heads. Decoding: with the ``interval`` schedule
(``treekv+interval:every=16,budget=256``) every recompression replays the tokens that arrived since the last
one, continuing from the scope position kept in the layer state — the paper's per-token rule, applied in
batches of ``every`` tokens.

Deviations: (1) the paper's text was not retrievable here; the rule above is reconstructed from the paper's
description (fixed cache, moving two-token eviction scope, cyclic, averaged attention as importance).
(2) Importance is the attention a token receives from the last ``window`` queries, averaged over the queries
that can see it (causal), not the running average over every decoding step. (3) GQA: averaged over the query
heads of each KV head; the scope position is shared by the KV heads (every head holds ``c`` tokens).
(4) Score order for other budgets: tokens evicted later rank higher, so a budget component that asks a head for
more or fewer than ``c`` tokens gets the latest survivors of the same replay.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import Scorer
from kvsqueeze.spec import register


def averaged_attention(ctx: LayerContext, window: int) -> torch.Tensor:
    """``[B, H, L]``: attention of the last ``window`` queries, averaged over the queries that see each token."""
    probs = ctx.window_attention(window)  # [B, Hq, w, L]
    w, L = probs.shape[2], probs.shape[3]
    seen_by = torch.arange(L, device=probs.device)[None, :] <= torch.arange(L - w, L, device=probs.device)[:, None]
    return ctx.per_kv_head(probs.sum(2)) / seen_by.sum(0).clamp(min=1)


def tree_replay(importance: torch.Tensor, capacity: int, pointer: int = 0) -> tuple[torch.Tensor, int]:
    """Replay the cyclic scoped eviction over ``importance [H, N]`` (tokens in arrival order).

    The first ``capacity`` tokens fill the cache; each later token evicts the lower-scored of the two cached
    tokens at ``pointer`` and ``pointer + 1`` (a tie evicts the older), then the scope moves right, wrapping to 0.
    Returns ``rank [H, N]`` (eviction step, or ``N + 1`` for kept tokens: higher = kept longer) and the pointer.
    """
    H, N = importance.shape
    rank = torch.full((H, N), float(N + 1), device=importance.device)
    if capacity >= N:
        return rank, pointer
    if capacity < 2:
        rank[:, : N - capacity] = torch.arange(N - capacity, dtype=torch.float, device=importance.device)
        return rank, pointer
    # Within one pass of the scope (until it wraps), step ``j`` compares elements ``2j`` and ``2j + 1`` of
    # ``cache[pointer:] + arrivals``: the pairs are disjoint, so a whole pass is one vectorised comparison.
    cached = torch.arange(capacity, device=importance.device)[None, :].expand(H, capacity)
    arriving, step = capacity, 0
    while arriving < N:
        if pointer + 1 >= capacity:
            pointer = 0
        n = min(N - arriving, capacity - 1 - pointer)  # steps before the scope wraps
        new = torch.arange(arriving, arriving + n, device=importance.device)[None, :].expand(H, n)
        run = torch.cat([cached[:, pointer:], new], dim=1)
        left, right = run[:, 0 : 2 * n : 2], run[:, 1 : 2 * n : 2]
        evict_right = importance.gather(1, right) < importance.gather(1, left)  # a tie evicts the older
        kept, gone = torch.where(evict_right, left, right), torch.where(evict_right, right, left)
        order = torch.arange(step, step + n, dtype=rank.dtype, device=rank.device)[None, :].expand(H, n)
        rank.scatter_(1, gone, order)
        cached = torch.cat([cached[:, :pointer], kept, run[:, 2 * n :]], dim=1)
        pointer, arriving, step = pointer + n, arriving + n, step + n
    return rank, pointer


@register
class TreeKV(Scorer):
    name = "treekv"
    family = "structured"
    paper = "TreeKV: Smooth Key-Value Cache Compression with Tree Structures"
    arxiv = "2501.04987"
    window: int = Field(32, ge=1)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        B, H, L = ctx.keys.shape[:3]
        importance = averaged_attention(ctx, self.window)
        keep = ctx.keep if ctx.keep is not None else ctx.valid.sum(-1)
        pointers = list(ctx.state.get("treekv_pointer") or [0] * B)  # a copy: forks share the parent's state
        if len(pointers) != B:
            pointers = [0] * B
        out = torch.full((B, H, L), float("-inf"), device=ctx.keys.device)
        for b in range(B):
            idx = ctx.valid[b].nonzero().flatten()  # arrival order (left padding skipped)
            rank, pointers[b] = tree_replay(importance[b][:, idx], int(keep[b]), pointers[b])
            out[b][:, idx] = rank + importance[b][:, idx].clamp(0, 1) * 0.5  # tie-break survivors by importance
        ctx.state["treekv_pointer"] = pointers
        return out
