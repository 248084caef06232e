"""``CompressedCache``: the transformers ``Cache`` kvsqueeze gives to ``model.generate``.

One :class:`~kvsqueeze.core.layer.CompressedLayer` per attention layer (full-attention and sliding-window alike;
with method ``none`` sliding layers stay transformers' own ``DynamicSlidingWindowLayer``). The model is never
changed: the cache binds each layer it updates to the next attention call (:mod:`kvsqueeze.core.binding`); that
call runs the model's own attention while a layer holds everything uncompressed, the cache's attention over
compressed storage afterwards, and lets the method's schedule compress through the one pipeline
(:mod:`kvsqueeze.core.compressor`).

The cache knows which model it serves (the model's text config) and, when they pass through kvsqueeze's own entry
points (``prefill``, ``kvsqueeze.pipeline``), which tokens it holds.
"""

from __future__ import annotations

import copy
import time
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from kvsqueeze.core import binding
from kvsqueeze.core.architectures import attention_modules, plan_layers
from kvsqueeze.core.context import AttentionCall
from kvsqueeze.core.layer import CompressedLayer
from kvsqueeze.core.storage import storage_bytes, storage_keys, tensor_bytes, walk_tensors
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import Method
from kvsqueeze.validation import parse_method_arg, validate_budget


class LayerBinding:
    """The attention call of layer ``layer_idx`` bound to its cache (held weakly: a binding never keeps a dropped
    cache alive)."""

    def __init__(self, cache: CompressedCache, layer_idx: int):
        self.cache_ref = weakref.ref(cache)
        self.layer_idx = layer_idx

    def attend(self, inner, module, query, key, value, attention_mask, **kwargs):
        cache = self.cache_ref()
        if cache is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        cache.check_module(module)
        layer = cache.layers[self.layer_idx]
        scaling = kwargs.get("scaling")
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        compressed = isinstance(layer, CompressedLayer) and layer.compressed
        if compressed:
            if module.training and kwargs.get("dropout", 0.0):
                raise KVSqueezeError("attention dropout (training mode) over a compressed cache: call model.eval()")
            out = layer.attend(query, attention_mask, scaling, softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"))
            result = (out, None)
        else:
            result = inner(module, query, key, value, attention_mask, **kwargs)
        call = AttentionCall(module, query, attention_mask, scaling, kwargs.get("position_ids"))
        if cache.attention_observer is not None:
            cache.attention_observer(self.layer_idx, call, key, value)
        if isinstance(layer, CompressedLayer) and cache.compresses:
            start = time.perf_counter()
            cache.method.schedule.after_attention(cache, layer, call)
            cache.compression_seconds += time.perf_counter() - start
            if query.shape[2] > 1:
                cache.track_peak()
        return result


class CompressedCache(Cache):
    """A transformers ``Cache`` that compresses each layer with a kvsqueeze method.

    ``ratio`` is the fraction of tokens removed (kvpress' convention); ``budget`` is tokens kept per head.
    Pass it to ``model.generate(past_key_values=cache)``. A cache continues from what it holds: a later
    ``generate`` whose prompt extends the cached tokens (a conversation) feeds only the new tokens.
    """

    def __init__(self, model, method: str | Method = "none", ratio: float | None = None, budget: int | None = None):
        self.method = parse_method_arg(method)
        self.ratio, self.budget = validate_budget(ratio, budget, self.method)
        if self.method.evicts and self.method.schedule.name == "prefill" and self.ratio is self.budget is None:
            self.ratio = 0.5  # the documented default
        self.compresses = self.method.evicts or not self.method.codec.is_dense or self.method.schedule.name != "prefill"
        plans = plan_layers(model)
        layers: list[CacheLayerMixin] = []
        for idx, plan in enumerate(plans):
            if plan.kind == "sliding" and not self.compresses:
                layers.append(DynamicSlidingWindowLayer(sliding_window=plan.sliding_window))  # exact, as transformers
            else:
                layers.append(CompressedLayer(idx, self.method.codec, sliding_window=plan.sliding_window))
        super().__init__(layers=layers)
        self.num_layers = len(layers)
        self.config = model.config.get_text_config()
        self.implementation = model.config._attn_implementation
        if self.implementation == "eager":
            modules = attention_modules(model)
            if modules and "eager_attention_forward" not in type(modules[0]).forward.__globals__:
                raise KVSqueezeError(
                    f"{type(model).__name__}'s eager attention cannot be wrapped; load it with "
                    "attn_implementation='sdpa'"
                )
        binding.install(self.implementation)
        self.shared_state: dict = {"config": self.config}  # cache-wide state (CAKE's cascade); the text config
        self.compression_seconds = 0.0
        self.peak_bytes = 0
        self.tokens: torch.Tensor | None = None  # [B, L] token ids held, when they went through kvsqueeze
        self.attention_observer = None  # called as fn(layer_idx, AttentionCall, keys, values) after each attention
        self.inherited: frozenset = frozenset()  # storages shared with the cache this one was forked from
        self._known_configs = {id(self.config)}
        self._bindings = [LayerBinding(self, idx) for idx in range(self.num_layers)]

    # ---- transformers' Cache contract --------------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        stale = binding.pending()
        if isinstance(stale, LayerBinding) and stale.cache_ref() is self and stale.layer_idx < layer_idx:
            binding.bind(None)
            raise KVSqueezeError(
                f"layer {stale.layer_idx}'s attention did not go through kvsqueeze: the model's attention "
                f"implementation changed after the cache was built (it was {self.implementation!r}); build the cache "
                "after choosing the implementation"
            )
        if key_states.shape[-2] == 0:
            raise KVSqueezeError(
                f"no new tokens for a cache holding {self.get_seq_length()}: the prompt must extend the cached tokens"
            )
        layer = self.layers[layer_idx]
        keys, values = layer.update(key_states, value_states, *args, **kwargs)
        if self.compresses or self.attention_observer is not None or getattr(layer, "compressed", False):
            binding.bind(self._bindings[layer_idx])
            if key_states.shape[-2] > 1 and self.compresses:
                self.track_peak()
        return keys, values

    def check_module(self, module) -> None:
        """Refuse an attention module of another model (checked once per config object)."""
        config = getattr(module, "config", None)
        if config is None or id(config) in self._known_configs:
            return
        mine, theirs = self.config.to_dict(), config.get_text_config().to_dict()
        ignore = {"_attn_implementation_autoset", "_name_or_path", "transformers_version", "dtype", "torch_dtype"}
        if {k: v for k, v in mine.items() if k not in ignore} != {k: v for k, v in theirs.items() if k not in ignore}:
            binding.bind(None)
            raise KVSqueezeError(
                f"this cache was built for a {self.config.model_type} model with another configuration; build a "
                "CompressedCache for the model you run"
            )
        self._known_configs.add(id(config))

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def prefill(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Run the model over a context so that it is compressed now (query-agnostic mode); returns the logits of the
        last position ``[B, 1, V]``."""
        held = self.get_seq_length()
        if held:
            raise KVSqueezeError(
                f"this cache already holds {held} tokens: prefill a new cache, or answer from cache.fork()"
            )
        if input_ids.dim() != 2 or input_ids.shape[-1] == 0:
            raise KVSqueezeError("prefill needs token ids of shape [batch, length] with length >= 1")
        device = next(model.parameters()).device
        input_ids = input_ids.to(device)
        with torch.no_grad():
            out = model(
                input_ids=input_ids,
                attention_mask=None if attention_mask is None else attention_mask.to(device),
                past_key_values=self,
                use_cache=True,
                logits_to_keep=1,
            )
        self.tokens = input_ids.detach().cpu()
        return out.logits

    def expect(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The part of ``input_ids [B, L]`` not yet in the cache, after checking that it extends the cached tokens
        (when they are known); kvsqueeze's own entry points call this before a forward pass."""
        held = self.get_seq_length()
        if input_ids.shape[-1] <= held:
            raise KVSqueezeError(
                f"a prompt of {input_ids.shape[-1]} tokens does not extend the {held} tokens this cache holds; "
                "use a fork of the compressed context or a new cache"
            )
        if self.tokens is not None and held:
            known = self.tokens.to(input_ids.device)
            if known.shape[-1] != held or not torch.equal(input_ids[..., :held], known.expand(input_ids.shape[0], -1)):
                raise KVSqueezeError(
                    "the prompt does not start with the tokens this cache holds; use a fork of the compressed "
                    "context the prompt extends, or a new cache"
                )
        self.tokens = input_ids.detach().cpu()
        return input_ids[..., held:]

    def fork(self) -> CompressedCache:
        """A cache that shares this one's compressed storage (no copy) and grows independently.

        Tensors are never modified in place, so answering a question from a fork leaves this cache as it was:
        compress a context once, then answer several questions from forks of it. A fork counts the shared storage in
        ``nbytes()``; ``nbytes(own_only=True)`` is what it added.
        """
        twin = copy.copy(self)
        twin.layers = []
        for layer in self.layers:
            clone = copy.copy(layer)
            if isinstance(layer, CompressedLayer):
                clone.blocks = list(layer.blocks)
                clone.state = dict(layer.state)
            twin.layers.append(clone)
        twin.shared_state = dict(self.shared_state)
        twin.inherited = frozenset(self.storages())
        twin._known_configs = set(self._known_configs)
        twin._bindings = [LayerBinding(twin, idx) for idx in range(self.num_layers)]
        twin.compression_seconds = 0.0
        return twin

    # ---- generate features -------------------------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.tokens is not None and tokens_to_remove < 0:
            self.tokens = self.tokens[..., :tokens_to_remove]

    # ---- what users ask ----------------------------------------------------------------------------------------
    def held_objects(self) -> list:
        """What the cache keeps alive: every layer's storage, the cache-wide state and the token ids it records."""
        objects: list = []
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                objects += layer.tensors()
            elif layer.is_initialized:
                objects += [layer.keys, layer.values]
        return [*objects, self.shared_state, self.tokens]

    def storages(self) -> dict[tuple, int]:
        """Distinct storages the cache keeps alive: key → bytes."""
        seen: set[int] = set()
        return storage_keys(t for obj in self.held_objects() for t in walk_tensors(obj, seen))

    def nbytes(self, own_only: bool = False) -> int:
        """Bytes of the distinct storages the cache keeps alive (keys, values, codes, scales, metadata, scorer
        state). ``own_only``: a fork's additions, without the storage it shares with the cache it was forked from."""
        return storage_bytes(*self.held_objects(), exclude=self.inherited if own_only else frozenset())

    def track_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    def full_nbytes(self) -> int:
        """What transformers' ``DynamicCache`` would hold for the same tokens."""
        total = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            B, H, _, D = layer.keys.shape
            if isinstance(layer, CompressedLayer):
                tokens = layer.seen if not layer.is_sliding else min(layer.seen, layer.sliding_window - 1)
                total += 2 * B * H * tokens * D * torch.finfo(layer.dtype).bits // 8
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
        return {
            "method": self.method.spec(),
            "ratio": self.ratio,
            "budget": self.budget,
            "tokens_seen": self.get_seq_length(),
            "tokens_kept_mean": sum(values) / len(values) if values else 0.0,
            "tokens_kept": kept,
            "cache_bytes": self.nbytes(),
            "full_cache_bytes": self.full_nbytes(),
            "peak_cache_bytes": self.peak_bytes,
        }
