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
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from kvsqueeze.core import binding, persist, tiers
from kvsqueeze.core.architectures import attention_modules, plan_layers
from kvsqueeze.core.compat import passed_cache, with_cache
from kvsqueeze.core.context import PREFILLING, AttentionCall
from kvsqueeze.core.layer import CompressedLayer
from kvsqueeze.core.storage import storage_bytes, storage_keys, tensor_bytes, walk_tensors
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import Method
from kvsqueeze.validation import parse_method_arg, validate_budget


def remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def layer_snapshot(layer) -> dict:
    """What restores a cache layer exactly (its tensors are never modified in place, so references suffice)."""
    snapshot = dict(layer.__dict__)
    for name in ("blocks", "state"):
        if name in snapshot:
            snapshot[name] = copy.copy(snapshot[name])
    return snapshot


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
        replaced = None
        if cache.replay_attention is not None and not compressed:
            replaced = cache.replay_attention(self.layer_idx, module, query, key, value, attention_mask, kwargs)
        if replaced is not None:
            result = replaced
        elif compressed:
            if module.training and kwargs.get("dropout", 0.0):
                raise KVSqueezeError("attention dropout (training mode) over a compressed cache: call model.eval()")
            with tiers.metered(cache.fetch_meter):  # bytes retrieval blocks bring from their cold tier
                out = layer.attend(
                    query, attention_mask, scaling, softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux")
                )
            if self.layer_idx == 0:
                cache.fetch_meter.tokens += query.shape[2]
                cache.fetch_meter.steps += 1
            result = (out, None)
        else:
            result = inner(module, query, key, value, attention_mask, **kwargs)
        call = AttentionCall(module, query, attention_mask, scaling, kwargs.get("position_ids"))
        if cache.attention_observer is not None:
            cache.attention_observer(self.layer_idx, call, key, value)
        if isinstance(layer, CompressedLayer) and cache.compresses and not cache.replaying:
            start = time.perf_counter()
            cache.method.schedule.after_attention(cache, layer, call)
            cache.compression_seconds += time.perf_counter() - start
            if query.shape[2] > 1:
                cache.track_peak()
        return result


class CompressedCache(Cache):
    """A transformers ``Cache`` that compresses each layer with a kvsqueeze method.

    ``ratio`` is the fraction of tokens removed (kvpress' convention); ``budget`` is tokens kept per head.
    Pass it to ``model.generate(cache=cache)`` (``past_key_values=cache`` before transformers 5.24). A cache
    continues from what it holds: a later ``generate`` whose prompt extends the cached tokens (a conversation) feeds
    only the new tokens.
    """

    def __init__(
        self,
        model,
        method: str | Method = "none",
        ratio: float | Sequence[float] | None = None,
        budget: int | None = None,
        tokenizer=None,
    ):
        self.method = parse_method_arg(method)
        plans = plan_layers(model)
        self.layer_ratios: list[float] | None = None
        if isinstance(ratio, (list, tuple)):  # one ratio per layer (kvpress' per-layer compression)
            if len(ratio) != len(plans):
                raise KVSqueezeError(f"give one ratio per layer: {len(plans)} layers, {len(ratio)} ratios")
            self.layer_ratios = [validate_budget(r, budget, self.method)[0] or 0.0 for r in ratio]
            ratio = max(self.layer_ratios) or None
        self.ratio, self.budget = validate_budget(ratio, budget, self.method)
        if self.method.evicts and self.method.schedule.name == "prefill" and self.ratio is self.budget is None:
            self.ratio = 0.5  # the documented default
        self.compresses = self.method.evicts or not self.method.codec.is_dense or self.method.schedule.name != "prefill"
        layers: list[CacheLayerMixin] = []
        for idx, plan in enumerate(plans):
            if plan.kind == "sliding" and not self.compresses:
                layers.append(DynamicSlidingWindowLayer(sliding_window=plan.sliding_window))  # exact, as transformers
            else:
                layers.append(CompressedLayer(idx, self.method.codec, sliding_window=plan.sliding_window))
        super().__init__(layers=layers)
        self.num_layers = len(layers)
        self.config = model.config.get_text_config()
        self.model_class = type(model).__name__
        self.implementation = model.config._attn_implementation
        if self.implementation == "sdpa" and getattr(self.config, "attn_logit_softcapping", None):
            raise KVSqueezeError(
                f"{type(model).__name__} softcaps its attention logits, which sdpa does not do; load it with "
                "attn_implementation='eager'"
            )
        if self.implementation == "eager":
            modules = attention_modules(model)
            if modules and binding.model_eager(modules[0]) is None:
                raise KVSqueezeError(
                    f"{type(model).__name__}'s eager attention cannot be wrapped; load it with "
                    "attn_implementation='sdpa'"
                )
        binding.install(self.implementation)
        self.shared_state: dict = {"config": self.config}  # cache-wide state (CAKE's cascade); the text config
        self.compression_seconds = 0.0
        self.peak_bytes = 0
        self.tokens: torch.Tensor | None = None  # [B, L] token ids held, when they went through kvsqueeze
        self.lineage = object()  # the same object for this cache and every fork of it (copied by fork)
        self.attention_observer = None  # called as fn(layer_idx, AttentionCall, keys, values) after each attention
        self.inherited: frozenset = frozenset()  # storages shared with the cache this one was forked from
        self.inherited_stores: frozenset = frozenset()  # ids of the cold stores shared with it
        self._known_configs = {id(self.config)}
        self._bindings = [LayerBinding(self, idx) for idx in range(self.num_layers)]
        self.tokenizer = tokenizer  # whole-context scorers that build prompts (KVzip's repeat prompt) need it
        self._model = weakref.ref(model)
        self.replaying = False  # inside replay(): attention is observed, nothing is compressed
        self.replay_attention = None  # inside replay(): may compute an uncompressed layer's attention itself
        self._hooks: list = []  # hook handles a scorer attached to the model, removed when this cache is dropped
        self.fetch_meter = tiers.FetchMeter()  # bytes fetched from cold tiers, tokens decoded over compressed storage
        self.method.codec.attach(self, model)
        if self.method.evicts:
            self.method.scorer.attach(self, model)

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

    def layer_ratio(self, layer_idx: int) -> float | None:
        """The ratio applied to one layer (per-layer ratios when given, else the cache's)."""
        return self.ratio if self.layer_ratios is None else self.layer_ratios[layer_idx]

    def check_module(self, module) -> None:
        """Refuse an attention module of another model (checked once per config object)."""
        config = getattr(module, "config", None)
        if config is None or id(config) in self._known_configs:
            return
        if persist.config_hash(config) != persist.config_hash(self.config):  # what a saved cache is checked by too
            binding.bind(None)
            raise KVSqueezeError(
                f"this cache was built for a {self.config.model_type} model with another configuration; build a "
                "CompressedCache for the model you run"
            )
        self._known_configs.add(id(config))

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def prefill(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Run the model over a context so that it is compressed now (query-agnostic mode); returns the logits of the
        last position ``[B, 1, V]``. A scorer with a prefill chunk (``Scorer.prefill_chunk``) gets a long context in
        chunks, one forward each (positions continue), and compresses each chunk as it passes."""
        held = self.get_seq_length()
        if held:
            raise KVSqueezeError(
                f"this cache already holds {held} tokens: prefill a new cache, or answer from cache.fork()"
            )
        if input_ids.dim() != 2 or input_ids.shape[-1] == 0:
            raise KVSqueezeError("prefill needs token ids of shape [batch, length] with length >= 1")
        device = next(model.parameters()).device
        input_ids = input_ids.to(device)
        mask = None if attention_mask is None else attention_mask.to(device)
        length = input_ids.shape[-1]
        chunk = self.method.scorer.prefill_chunk(length) if self.method.evicts else None
        chunk = chunk or length
        self.tokens = input_ids.detach().cpu()  # known during the forward (whole-context scorers read them)
        if chunk < length:  # a chunked prefill: the scorer compresses each chunk as it passes
            self.shared_state[PREFILLING] = length
        try:
            with torch.no_grad():
                for start in range(0, length, chunk):
                    end = min(start + chunk, length)
                    out = model(
                        input_ids=input_ids[:, start:end],
                        attention_mask=None if mask is None else mask[:, :end],
                        **with_cache(model, self),
                        use_cache=True,
                        logits_to_keep=1,
                    )
        except BaseException:
            self.tokens = None
            raise
        finally:
            self.shared_state.pop(PREFILLING, None)
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
        twin.fetch_meter = tiers.FetchMeter()
        twin.inherited_stores = frozenset(id(s) for s in tiers.cold_stores(*self.held_objects()))
        return twin

    def served_model(self):
        """The model this cache was built for (held weakly: None once the caller dropped it)."""
        return self._model()

    def keep_hook(self, handle) -> None:
        """Keep a hook handle on the model for as long as this cache lives (removed when it is dropped)."""
        if not self._hooks:
            weakref.finalize(self, remove_hooks, self._hooks)
        self._hooks.append(handle)

    def follow_tokens(self, model) -> None:
        """Record the token ids of every forward of ``model`` that extends this cache (``model.generate`` included),
        so whole-context scorers know the text they compress; a forward pre-hook kept as long as this cache lives."""
        ref = weakref.ref(self)

        def record(module, args, kwargs):
            cache = ref()
            ids = kwargs.get("input_ids", args[0] if args else None)
            if cache is None or passed_cache(kwargs) is not cache or ids is None or cache.replaying:
                return
            held = cache.get_seq_length()
            if held == 0:
                cache.tokens = ids.detach().cpu()
            elif cache.tokens is not None and cache.tokens.shape[-1] == held and ids.shape[0] == cache.tokens.shape[0]:
                cache.tokens = torch.cat([cache.tokens, ids.detach().cpu()], dim=-1)

        self.keep_hook(model.register_forward_pre_hook(record, with_kwargs=True))

    def replay(
        self, model, input_ids: torch.Tensor, observer, attention_mask: torch.Tensor | None = None, attention=None
    ) -> None:
        """Run ``model`` over ``input_ids [B, n]`` placed after what the cache holds (positions continue), calling
        ``observer(layer_idx, AttentionCall, keys, values)`` after every layer's attention, then put every layer back
        exactly as it was (the same tensors): a pass that leaves no trace, e.g. KVzip's reconstruction. Nothing is
        compressed during it; ``attention_mask`` covers held and new tokens (None: no padding). ``attention(layer_idx,
        module, query, keys, values, mask, kwargs)`` may return a layer's attention result ``(out, weights)``
        computed from the same inputs (None: the model's own attention runs)."""
        held = self.get_seq_length()
        snapshots = [layer_snapshot(layer) for layer in self.layers]
        saved = self.attention_observer, self.tokens, self.peak_bytes
        self.attention_observer, self.replaying, self.replay_attention = observer, True, attention
        device = next(model.parameters()).device
        input_ids = input_ids.to(device)
        positions = torch.arange(held, held + input_ids.shape[-1], device=device)[None].expand(input_ids.shape[0], -1)
        try:
            with torch.no_grad():
                model(
                    input_ids=input_ids,
                    attention_mask=None if attention_mask is None else attention_mask.to(device),
                    position_ids=positions,
                    **with_cache(model, self),
                    use_cache=True,
                    logits_to_keep=1,
                )
        finally:
            binding.bind(None)
            for layer, snapshot in zip(self.layers, snapshots, strict=True):
                layer.__dict__.clear()
                layer.__dict__.update(snapshot)
            self.attention_observer, self.tokens, self.peak_bytes = saved
            self.replaying, self.replay_attention = False, None

    # ---- beyond one process ---------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write this cache to one safetensors file (bit-exact; see :mod:`kvsqueeze.core.persist`)."""
        return persist.save(self, path)

    @classmethod
    def load(cls, path, model, tokenizer=None) -> CompressedCache:
        """The cache saved at ``path``, for ``model`` (the one it was computed with: checked)."""
        return persist.load(cls, path, model, tokenizer)

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

    def nbytes(self, own_only: bool = False, tier: str | None = None) -> int:
        """Bytes of the distinct storages the cache keeps alive (keys, values, codes, scales, metadata, scorer
        state). ``own_only``: a fork's additions, without the storage it shares with the cache it was forked from.

        ``tier`` (retrieval methods, :mod:`kvsqueeze.core.tiers`): ``"hot"`` — the storages attention reads in place
        (everything but cold stores); ``"cold"`` — cold stores in RAM plus disk-backed ones (file bytes, which the
        default, ``None``, leaves out: it counts process memory)."""
        if tier not in (None, "hot", "cold"):
            raise KVSqueezeError(f"unknown tier {tier!r}; use tier='hot' or tier='cold'")
        held = self.held_objects()
        exclude = self.inherited if own_only else frozenset()
        if tier is None:
            return storage_bytes(*held, exclude=exclude)
        cold = tiers.cold_keys(*held)
        if tier == "hot":
            return storage_bytes(*held, exclude=frozenset(exclude) | set(cold))
        own_stores = tiers.cold_stores(*held)
        if own_only:
            own_stores = [s for s in own_stores if id(s) not in self.inherited_stores]
        ram = sum(n for key, n in cold.items() if key not in exclude)
        return ram + sum(m.nbytes for store in own_stores for m, _, _ in store.maps.values())

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
                seen = layer.seen + layer.shift
                tokens = seen if not layer.is_sliding else min(seen, layer.sliding_window - 1)
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
            "ratio": self.layer_ratios if self.layer_ratios is not None else self.ratio,
            "budget": self.budget,
            "tokens_seen": self.get_seq_length(),
            "tokens_kept_mean": sum(values) / len(values) if values else 0.0,
            "tokens_kept": kept,
            "cache_bytes": self.nbytes(),
            "full_cache_bytes": self.full_nbytes(),
            "peak_cache_bytes": self.peak_bytes,
            "hot_bytes": self.nbytes(tier="hot"),
            "cold_bytes": self.nbytes(tier="cold"),
            "fetched_bytes": self.fetch_meter.fetched_bytes,
            "fetched_bytes_per_token": self.fetch_meter.per_token(),
            "fetched_bytes_per_step": self.fetch_meter.per_step(),
        }
