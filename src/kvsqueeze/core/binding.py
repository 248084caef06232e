"""The explicit binding between an attention call and the cache that stores its layer.

transformers' attention modules call ``past_key_values.update(k, v, layer_idx)`` and then the attention function
registered under the model's implementation name (``sdpa``, ``eager``, ``flash_attention_2``, ``flex_attention``
…). kvsqueeze leaves the model and its implementation name as they are; instead:

1. the first :class:`~kvsqueeze.core.cache.CompressedCache` built for a model wraps the function registered under
   that model's implementation name (:func:`install`, once per name, through transformers' public
   ``AttentionInterface.register``). The wrapper is inert: with nothing bound it calls the original function with
   the original arguments, so every other model and every plain forward are bit for bit what they were;
2. ``CompressedCache.update`` binds the layer it just updated (:func:`bind`, a context variable: per thread and
   per task); the wrapper takes the binding (it is consumed by exactly one call) and lets it attend — the model's own
   implementation for layers that hold everything uncompressed (exact, with its softcap, sinks and windows), the
   cache's attention over compressed storage otherwise — then lets the cache compress on its schedule.

:class:`Binding` is the documented seam the benchmark uses too (one batch row per cache, a recording prefill).
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable
from typing import Protocol

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvsqueeze.errors import KVSqueezeError

AttentionFunction = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


class Binding(Protocol):
    """What one bound attention call runs: ``inner`` is the model's own attention function."""

    layer_idx: int

    def attend(
        self, inner: AttentionFunction, module, query, key, value, attention_mask, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


_BOUND: contextvars.ContextVar[Binding | None] = contextvars.ContextVar("kvsqueeze_binding", default=None)


def bind(binding: Binding | None) -> None:
    """Bind the next attention call of this thread/task to ``binding`` (None unbinds)."""
    _BOUND.set(binding)


def pending() -> Binding | None:
    """The binding no attention call has taken yet (None when there is none)."""
    return _BOUND.get()


def model_eager(module) -> AttentionFunction | None:
    """The eager attention function of ``module``'s modeling file (what transformers falls back to for "eager"), or
    None. ``forward`` may be wrapped by a decorator (transformers' ``deprecate_kwarg``): its globals are those of the
    function it wraps."""
    return inspect.unwrap(type(module).forward).__globals__.get("eager_attention_forward")


def _model_eager(module) -> AttentionFunction:
    function = model_eager(module)
    if function is None:
        raise KVSqueezeError(
            f"{type(module).__name__} has no eager_attention_forward to wrap; load the model with "
            "attn_implementation='sdpa'"
        )
    return function


def _wrapper(name: str, original: AttentionFunction | None) -> AttentionFunction:
    def kvsqueeze_dispatch(module, query, key, value, attention_mask, **kwargs):
        inner = original if original is not None else _model_eager(module)
        binding = _BOUND.get()
        if binding is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        _BOUND.set(None)
        if binding.layer_idx != getattr(module, "layer_idx", binding.layer_idx):
            raise KVSqueezeError(
                f"attention of layer {getattr(module, 'layer_idx', '?')} reached the cache bound to layer "
                f"{binding.layer_idx}: this model's attention does not follow transformers' update-then-attend order"
            )
        return binding.attend(inner, module, query, key, value, attention_mask, **kwargs)

    kvsqueeze_dispatch.kvsqueeze_wraps = name
    return kvsqueeze_dispatch


def install(implementation: str) -> None:
    """Wrap the attention function registered under ``implementation`` (once; inert while nothing is bound)."""
    if implementation is None:
        raise KVSqueezeError("the model has no attention implementation set (config._attn_implementation is None)")
    current = ALL_ATTENTION_FUNCTIONS.get(implementation)
    if getattr(current, "kvsqueeze_wraps", None) == implementation:
        return
    if current is None and implementation != "eager":
        raise KVSqueezeError(f"attention implementation {implementation!r} is not registered with transformers")
    AttentionInterface.register(implementation, _wrapper(implementation, current))


def installed(implementation: str) -> bool:
    """Whether ``implementation``'s attention function is wrapped (every call can reach a bound cache)."""
    return getattr(ALL_ATTENTION_FUNCTIONS.get(implementation), "kvsqueeze_wraps", None) == implementation
