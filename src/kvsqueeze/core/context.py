"""What a compression step knows about one attention layer: :class:`LayerContext`.

Shapes: ``B`` batch, ``H`` KV heads, ``Hq`` query heads (``Hq = H * groups``), ``L`` tokens, ``D`` head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvsqueeze.errors import KVSqueezeError

SCRATCH = "scratch"  # LayerContext.shared[SCRATCH]: cross-layer state of one pass, dropped after the last layer
PREFILLING = "prefilling"  # shared state during a chunked prefill (Scorer.prefill_chunk): the context's length


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
    sliding_window: int | None = None  # the layer's attention window (None: full attention)
    tokens: torch.Tensor | None = None  # [B, L] token ids of the L held tokens, when the cache knows them (CPU)
    tokenizer: object | None = None  # the cache's tokenizer, when given (codecs that read the text: SentenceKV)

    @property
    def scratch(self) -> dict:
        """Cross-layer working state of one compression pass over the layers (cascading budgets, index reuse
        across a layer group): dropped once the last layer is compressed, so the cache never keeps it."""
        return self.shared.setdefault(SCRATCH, {})

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


@dataclass
class AttentionCall:
    """One attention call of one layer, as the bound cache sees it (what schedules act on)."""

    module: object  # the attention module (its config holds the RoPE settings)
    queries: torch.Tensor  # [B, Hq, M, D] post-RoPE queries of the M new tokens
    attention_mask: object  # the mask in the model implementation's format (see kvsqueeze.core.masks)
    scaling: float
    position_ids: torch.Tensor | None = None  # [B|1, M] RoPE positions of the new tokens


@dataclass
class DecodeStep:
    """What a decoding schedule's statistics hook (``observe``) sees after every forward pass of a layer.

    ``keys``/``valid``: everything the layer holds (full precision, rows left-padded), the new tokens last;
    ``queries`` ``[B, Hq, M, D]`` and ``positions`` ``[B, M]`` of the pass's new tokens; ``probs``: their causal
    attention over the held keys ``[B, Hq, M, L]`` when the hook asked for it (``needs_attention``), else None;
    ``first``: the layer's first pass (every held token is new)."""

    keys: torch.Tensor
    valid: torch.Tensor
    queries: torch.Tensor
    positions: torch.Tensor
    probs: torch.Tensor | None
    first: bool
    module: object = None


def per_kv_head(x: torch.Tensor, H: int) -> torch.Tensor:
    """Mean of ``[B, Hq, ...]`` over the query heads of each KV group: ``[B, H, ...]``."""
    B, Hq = x.shape[:2]
    return x.view(B, H, Hq // H, *x.shape[2:]).mean(2)
