"""What a scorer and a budget allocator see, and the selection step they share.

Shapes: ``B`` batch, ``H`` KV heads, ``Hq`` query heads (``Hq = H * groups``), ``L`` tokens, ``D`` head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import Component

PROTECTED = float("inf")  # score of a token that must be kept (sinks, observation window)
PREFILL_MEMO = "prefill_memo"  # key of LayerContext.shared: work shared by caches built from one captured prefill


@dataclass
class LayerContext:
    """Everything known about one attention layer at compression time."""

    layer_idx: int
    num_layers: int
    keys: torch.Tensor  # [B, H, L, D], post-RoPE, as cached
    values: torch.Tensor  # [B, H, L, D]
    queries: torch.Tensor | None  # [B, Hq, Lq, D]: queries of the last Lq tokens (Lq <= L), post-RoPE
    valid: torch.Tensor  # [B, L] bool: real tokens (False = padding)
    scaling: float
    positions: torch.Tensor | None = None  # [B, L] RoPE positions (position_ids)
    keep: torch.Tensor | None = None  # [B] uniform per-head budget of each row
    state: dict = field(default_factory=dict)  # per-layer state a component keeps between calls
    shared: dict = field(default_factory=dict)  # cache-wide state (layer allocators that cascade across layers)
    scores: torch.Tensor | None = None  # [B, H, L] the scorer's scores, set by the cache after scoring (codecs read it)
    stored: torch.Tensor | None = None  # [B, H, L] bool: tokens handed to Codec.encode (flat order), set by the cache

    @property
    def groups(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1] if self.queries is not None else 1

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    def require_queries(self, who: str, count: int = 1) -> torch.Tensor:
        if self.queries is None or self.queries.shape[2] < count:
            raise KVSqueezeError(f"{who} needs the last {count} queries, which this schedule does not provide")
        return self.queries

    def window_attention(self, window: int) -> torch.Tensor:
        """Softmax attention of the last ``window`` queries over all keys: ``[B, Hq, w, L]`` (causal, no padding)."""
        q = self.require_queries("this scorer", 1)
        w = min(window, q.shape[2])
        q = q[:, :, -w:]
        keys = self.keys.repeat_interleave(self.groups, dim=1)
        logits = torch.matmul(q, keys.transpose(-1, -2)).float() * self.scaling
        L = self.length
        q_pos = torch.arange(L - w, L, device=q.device)
        visible = torch.arange(L, device=q.device)[None, :] <= q_pos[:, None]  # [w, L]
        visible = visible[None, None] & self.valid[:, None, None, :]
        logits = logits.masked_fill(~visible, float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)

    def per_kv_head(self, per_query_head: torch.Tensor) -> torch.Tensor:
        """Average a ``[B, Hq, ...]`` score over the query heads of each KV group: ``[B, H, ...]``."""
        B, Hq = per_query_head.shape[:2]
        return per_query_head.view(B, Hq // self.groups, self.groups, *per_query_head.shape[2:]).mean(2)


class Scorer(Component):
    """Scores tokens; the highest-scoring ones are kept. ``PROTECTED`` marks tokens kept regardless."""

    axis = "scorer"

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
    """Per-row tokens kept per head: ``round(n * (1 - ratio))`` or ``min(budget, n)``; never below 1."""
    n = valid_lengths.to(torch.long)
    if budget is not None:
        keep = torch.clamp(n, max=budget)
    else:
        keep = torch.tensor([math.ceil(int(x) * (1.0 - (ratio or 0.0)) - 1e-9) for x in n], dtype=torch.long)
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
    key = (name, ctx.layer_idx, id(ctx.queries), id(ctx.keys), ctx.length)
    if key not in memo:
        memo[key] = fn()
    return memo[key]
