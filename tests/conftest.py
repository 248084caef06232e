"""Shared fixtures: tiny random-weight models built in code (milliseconds, no files) and the embedded model."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

torch.set_num_threads(1)

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def tiny_model(kind: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**TINY))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=None))
    elif kind == "gemma3":
        cfg = Gemma3TextConfig(
            **{**TINY, "num_hidden_layers": 4, "num_key_value_heads": 1},
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        )
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    return model.eval()


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2():
    from kvsqueeze.models import load_model

    return load_model()
