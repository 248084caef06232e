"""Which models a :class:`~kvsqueeze.core.cache.CompressedCache` accepts, and the storage each layer gets.

A model is accepted when its attention modules follow transformers' contract: ``past_key_values.update(k, v,
layer_idx)`` then the attention function registered under the model's implementation name (models that declare
``_supports_attention_backend``). Full-attention layers and sliding-window layers are compressed (a sliding layer
keeps its window as an upper bound on what it holds and what a query sees); anything else is refused with one line
naming the architecture and why.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig
from transformers.cache_utils import get_layer_types_and_kwargs

from kvsqueeze.errors import KVSqueezeError


@dataclass(frozen=True)
class LayerPlan:
    kind: str  # "full" or "sliding"
    sliding_window: int | None = None


def check_model(model) -> None:
    """Refuse, in one line, what is not a loaded transformers model (``None``, a model id string, a tokenizer …)."""
    if not isinstance(getattr(model, "config", None), PretrainedConfig) or not hasattr(model, "modules"):
        what = f"the string {model!r}" if isinstance(model, str) else type(model).__name__
        raise KVSqueezeError(
            f"model must be a loaded transformers causal LM, got {what}; load one first, e.g. "
            "model, tokenizer = kvsqueeze.load_model() or AutoModelForCausalLM.from_pretrained(...)"
        )


def plan_layers(model) -> list[LayerPlan]:
    """One :class:`LayerPlan` per decoder layer of ``model``, or a one-line refusal."""
    check_model(model)
    name = type(model).__name__
    config = model.config.get_text_config()
    if getattr(model.config, "is_encoder_decoder", False):
        raise KVSqueezeError(f"unsupported architecture {name}: encoder-decoder (kvsqueeze compresses decoders)")
    if not getattr(model, "_supports_attention_backend", False):
        raise KVSqueezeError(
            f"unsupported architecture {name}: its attention is computed inside its own modeling code, not through "
            "transformers' attention interface, so a cache cannot attend over compressed storage; use a "
            "Llama/Qwen/Mistral/Gemma/Phi-3/GPT-NeoX/OLMo-style model"
        )
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    plans = []
    for kind, kwargs in zip(layer_types, layer_kwargs, strict=True):
        if kind == "full_attention":
            plans.append(LayerPlan("full"))
        elif kind == "sliding_attention" and kwargs.get("sliding_window"):
            plans.append(LayerPlan("sliding", int(kwargs["sliding_window"])))
        else:
            raise KVSqueezeError(
                f"unsupported architecture {name}: layer type {kind!r}; kvsqueeze compresses full-attention and "
                "sliding-window attention layers"
            )
    return plans


def attention_modules(model) -> list:
    """The attention modules of ``model`` (modules with a ``layer_idx`` whose class name ends in "Attention")."""
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
