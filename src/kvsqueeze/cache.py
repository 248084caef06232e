"""``CompressedCache``: the one transformers ``Cache`` kvsqueeze gives to ``model.generate``.

Per full-attention layer the cache holds

- ``blocks``: immutable runs of kept tokens in the codec's storage, per (row, KV head) — ragged allowed;
- the *tail* ``keys``/``values`` ``[B, H, T, D]``: full-precision tokens. After a dense, uniform compression
  the kept tokens live at the front of the tail (``n_front`` of them, visible to every later query); the
  rest of the tail is tokens appended since the last compression.

The cache reports the *logical* length (tokens seen) to transformers, so RoPE positions and masks never
shift after eviction; ``stats()`` and ``nbytes()`` report what is physically held.
"""

from __future__ import annotations

import copy
import threading
import warnings

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicSlidingWindowLayer,
    get_layer_types_and_kwargs,
)

from kvsqueeze.codecs.base import Codec, KVBlock, tensor_bytes
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policies.base import LayerContext, select, tokens_to_keep
from kvsqueeze.spec import Method, parse_method

_ACTIVE = threading.local()  # the cache whose update() ran last in this thread (read by the attention function)


class CompressedLayer(CacheLayerMixin):
    """Storage of one full-attention layer (see module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, codec: Codec):
        super().__init__()
        self.layer_idx = layer_idx
        self.codec = codec
        self.blocks: list[KVBlock] = []
        self.n_front = 0
        self.seen = 0
        self.compressions = 0
        self.state: dict = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        if self.compressed and not self.codec.is_dense:
            new = key_states.shape[-2]
            self.flush_residual(hold=new if new > 1 else 0)
        return self.keys, self.values

    def flush_residual(self, hold: int = 0) -> None:
        """Encode the oldest tail tokens beyond the codec's full-precision residual, whole groups at a time.

        ``hold``: the newest tokens stay in the tail regardless (the tokens of a multi-token forward, so that they
        attend to each other causally through the tail's mask; they are flushed at the next update)."""
        recent = self.keys.shape[-2] - self.n_front
        group = max(self.codec.group, 1)
        n = (recent - max(self.codec.residual, hold)) // group * group
        if n <= 0 or self.n_front:
            return
        B, H, _, D = self.keys.shape
        lengths = torch.full((B, H), n, dtype=torch.long)
        old_k, old_v = self.keys[..., :n, :], self.values[..., :n, :]
        block = self.codec.encode(old_k.reshape(-1, D), old_v.reshape(-1, D), lengths)
        merged = self.codec.extend(self.blocks[-1], block) if self.blocks else None
        if merged is not None:
            self.blocks[-1] = merged
        else:
            self.blocks.append(block)
        self.keys, self.values = self.keys[..., n:, :], self.values[..., n:, :]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.blocks, self.n_front, self.seen, self.compressions, self.state = [], 0, 0, 0, {}
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise KVSqueezeError("beam search is not supported by CompressedCache; use greedy or sampling")

    @property
    def compressed(self) -> bool:
        return self.compressions > 0

    def kept_lengths(self) -> torch.Tensor:
        """Tokens physically held per (row, KV head): ``[B, H]``."""
        if not self.is_initialized:
            return torch.zeros(0, 0, dtype=torch.long)
        B, H, T, _ = self.keys.shape
        lengths = torch.full((B, H), T, dtype=torch.long)
        for block in self.blocks:
            lengths += block.lengths
        return lengths

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return tensor_bytes(self.keys, self.values) + sum(b.nbytes() for b in self.blocks)

    def tail_mask(self, attention_mask: torch.Tensor | None, q_len: int) -> torch.Tensor | None:
        """Boolean mask of the query block over the tail ``[B|1, 1, q_len, T]`` (None = all visible)."""
        T = self.keys.shape[-2]
        n_recent = T - self.n_front
        if attention_mask is None:
            if q_len == 1:
                return None
            cols = torch.arange(n_recent, device=self.keys.device)
            rows = torch.arange(q_len, device=self.keys.device) + (n_recent - q_len)
            recent = (cols[None, :] <= rows[:, None])[None, None]
        else:
            if attention_mask.dtype != torch.bool:
                attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
            recent = attention_mask[..., -n_recent:] if n_recent else attention_mask[..., :0]
            if q_len == 1 and bool(recent.all()):
                return None
        front = torch.ones(*recent.shape[:-1], self.n_front, dtype=torch.bool, device=recent.device)
        return torch.cat([front, recent], dim=-1)


class CompressedCache(Cache):
    """A transformers ``Cache`` that compresses each layer with a kvsqueeze method.

    ``ratio`` is the fraction of tokens removed (kvpress' convention); ``budget`` is tokens kept per head.
    Pass it to ``model.generate(past_key_values=cache)``; the model's attention implementation is set to
    ``"kvsqueeze"`` (exact attention at prefill, then attention over the compressed storage).
    """

    def __init__(
        self,
        model,
        method: str | Method = "none",
        ratio: float | None = None,
        budget: int | None = None,
    ):
        from kvsqueeze.attention import ensure_registered

        self.method = parse_method(method)
        if ratio is not None and budget is not None:
            raise KVSqueezeError("give either ratio or budget, not both")
        if ratio is not None and not (0.0 <= float(ratio) < 1.0):
            raise KVSqueezeError(f"ratio must be in [0, 1) (fraction of tokens removed), got {ratio}")
        if budget is not None and int(budget) < 1:
            raise KVSqueezeError(f"budget must be >= 1 token per head, got {budget}")
        if self.method.evicts and ratio is None and budget is None:
            ratio = 0.5
        self.ratio = None if ratio is None else float(ratio)
        self.budget = None if budget is None else int(budget)
        config = model.config.get_text_config()
        if not getattr(model, "_supports_attention_backend", False):
            raise KVSqueezeError(
                f"unsupported architecture {type(model).__name__}: its attention does not use transformers' "
                "attention interface; use a Llama/Qwen2/Mistral/Gemma-3-style model"
            )
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
        layers: list[CacheLayerMixin] = []
        for idx, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
            if kind == "full_attention":
                layers.append(CompressedLayer(idx, self.method.codec))
            elif kind == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(**kwargs))  # sliding window kept as it is
            else:
                raise KVSqueezeError(
                    f"unsupported architecture: layer type {kind!r} in {type(model).__name__}; "
                    "kvsqueeze supports full-attention and sliding-window layers"
                )
        if not any(isinstance(layer, CompressedLayer) for layer in layers):
            raise KVSqueezeError(f"{type(model).__name__} has no full-attention layer to compress")
        super().__init__(layers=layers)
        self.num_layers = len(layers)
        self.scaling_override: float | None = None
        self._active: tuple[int, torch.Tensor] | None = None
        self.shared_state: dict = {"config": config}  # cache-wide state (CAKE's cascade); the text config
        self.compression_seconds = 0.0
        ensure_registered(model)

    # ---- transformers' Cache contract -------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._active = (layer_idx, keys)
        _ACTIVE.cache = self
        return keys, values

    def active_layer(self, layer_idx: int, keys: torch.Tensor) -> CompressedLayer | None:
        """The layer whose ``update`` returned ``keys`` (None for sliding layers or a stale call)."""
        if self._active is None or self._active[0] != layer_idx or self._active[1] is not keys:
            return None
        self._active = None
        layer = self.layers[layer_idx]
        return layer if isinstance(layer, CompressedLayer) else None

    # ---- compression -------------------------------------------------------------------------------
    def wants_compression(self, layer: CompressedLayer, q_len: int) -> bool:
        if not (self.method.evicts or not self.method.codec.is_dense):
            return False
        return self.method.schedule.due(layer, q_len)

    def compress_layer(
        self,
        layer: CompressedLayer,
        queries: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        scaling: float,
        position_ids: torch.Tensor | None = None,
    ) -> None:
        """Score, budget, select and encode everything ``layer`` holds in full precision."""
        keys, values = layer.keys, layer.values
        B, H, L, _ = keys.shape
        if layer.blocks or layer.n_front:
            raise KVSqueezeError("recompressing an already compressed layer needs a decoding schedule")
        valid = self._valid_tokens(attention_mask, B, L, keys.device)
        keep = tokens_to_keep(valid.sum(-1).cpu(), self.ratio, self.budget).to(keys.device)
        ctx = LayerContext(
            layer_idx=layer.layer_idx,
            num_layers=self.num_layers,
            keys=keys,
            values=values,
            queries=queries,
            valid=valid,
            scaling=scaling,
            positions=None if position_ids is None else position_ids.expand(B, -1)[:, -L:],
            keep=keep,
            state=layer.state,
            shared=self.shared_state,
        )
        if self.method.evicts:
            protected = self.method.scorer.protected(L)
            if int(keep.min()) < protected:
                raise KVSqueezeError(
                    f"{self.method.scorer.name} always keeps {protected} tokens but the budget is "
                    f"{int(keep.min())} per head; use a longer context, a smaller ratio or a larger budget"
                )
            scores = self.method.scorer.score(ctx)
            ctx.scores = scores
            counts = self.method.scorer.counts(scores, keep, ctx)  # head-aware selectors own their budgets
            if counts is None:
                counts = self.method.budget.allocate(scores, keep, ctx)
            keep_mask = select(scores, counts, valid)
            merged = self.method.scorer.merge(ctx, keep_mask)
            if merged is not None:
                layer.keys, layer.values = merged
        else:
            keep_mask = valid[:, None, :].expand(B, H, L)
        self._store(layer, keep_mask, ctx)

    def _store(self, layer: CompressedLayer, keep_mask: torch.Tensor, ctx: LayerContext | None = None) -> None:
        B, H, L, D = layer.keys.shape
        lengths = keep_mask.sum(-1).cpu()
        codec = self.method.codec
        if codec.is_dense and bool((lengths == lengths[0, 0]).all()):
            k = int(lengths[0, 0])
            layer.keys = layer.keys[keep_mask].view(B, H, k, D)
            layer.values = layer.values[keep_mask].view(B, H, k, D)
            layer.n_front = k
        else:
            # The last ``residual`` context tokens stay in the full-precision tail when every head kept them.
            r = min(codec.residual, keep_mask.shape[-1])
            if r and not bool(keep_mask[..., -r:].all()):  # kept by every head, and never padding
                r = 0
            body = keep_mask.clone()
            if r:
                body[..., -r:] = False
            lengths = body.sum(-1).cpu()
            if ctx is not None:
                ctx.stored = body
            layer.blocks = (
                [codec.encode(layer.keys[body], layer.values[body], lengths, ctx)] if int(lengths.sum()) else []
            )
            layer.keys, layer.values = layer.keys[..., L - r :, :], layer.values[..., L - r :, :]
            layer.n_front = 0
        layer.compressions += 1

    @staticmethod
    def _valid_tokens(attention_mask: torch.Tensor | None, B: int, L: int, device) -> torch.Tensor:
        """Real (non-padding) tokens ``[B, L]``: what the last query of each row may attend to."""
        if attention_mask is None:
            return torch.ones(B, L, dtype=torch.bool, device=device)
        last = attention_mask[:, 0, -1, -L:]
        if last.dtype != torch.bool:
            last = last > torch.finfo(last.dtype).min / 2
        return last.expand(B, L).clone()

    # ---- what users ask ---------------------------------------------------------------------------
    def fork(self) -> CompressedCache:
        """A cache that shares this one's compressed storage (no copy) and grows independently.

        Tensors are never modified in place, so answering a question from a fork leaves this cache as it
        was: compress a context once, then answer several questions from forks of it.
        """
        twin = copy.copy(self)
        twin.layers = []
        for layer in self.layers:
            clone = copy.copy(layer)
            if isinstance(layer, CompressedLayer):
                clone.blocks = list(layer.blocks)
                clone.state = dict(layer.state)
            twin.layers.append(clone)
        twin._active = None
        twin.shared_state = dict(self.shared_state)
        return twin

    def prefill(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Run the model over a context so that it is compressed now (query-agnostic mode)."""
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=self, use_cache=True)

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (keys, values, codes, scales, metadata)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                total += layer.nbytes()
            elif layer.is_initialized:
                total += tensor_bytes(layer.keys, layer.values)
        return total

    def full_nbytes(self) -> int:
        """What transformers' ``DynamicCache`` would hold for the same tokens."""
        total = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            B, H, _, D = layer.keys.shape
            if isinstance(layer, CompressedLayer):
                total += 2 * B * H * layer.seen * D * torch.finfo(layer.dtype).bits // 8
            else:
                total += tensor_bytes(layer.keys, layer.values)
        return total

    def stats(self) -> dict:
        """Tokens seen and kept (per layer and KV head), bytes held and what a full cache would hold."""
        kept = {}
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, CompressedLayer) and layer.is_initialized:
                kept[idx] = layer.kept_lengths().tolist()
        values = [x for rows in kept.values() for heads in rows for x in heads]
        first = next(layer for layer in self.layers if isinstance(layer, CompressedLayer))
        return {
            "method": self.method.spec(),
            "ratio": self.ratio,
            "budget": self.budget,
            "tokens_seen": first.seen,
            "tokens_kept_mean": sum(values) / len(values) if values else 0.0,
            "tokens_kept": kept,
            "cache_bytes": self.nbytes(),
            "full_cache_bytes": self.full_nbytes(),
        }


def warn_if_no_compression(budget: int | None, context_tokens: int) -> bool:
    """Warn when a budget is at least the context length (nothing will be evicted)."""
    if budget is not None and budget >= context_tokens:
        warnings.warn(f"budget {budget} >= context of {context_tokens} tokens: no compression", stacklevel=2)
        return True
    return False
