"""Shared helpers for the budget / head-selection tests: a tiny random Llama and hand-made contexts."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvsqueeze.policies.base import LayerContext


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    return model


def _make_ctx(
    B: int = 1, H: int = 2, L: int = 16, D: int = 8, layer_idx: int = 0, num_layers: int = 4, groups: int = 1, seed=0
) -> LayerContext:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, L, D, generator=g)
    values = torch.randn(B, H, L, D, generator=g)
    queries = torch.randn(B, H * groups, L, D, generator=g)
    return LayerContext(
        layer_idx=layer_idx,
        num_layers=num_layers,
        keys=keys,
        values=values,
        queries=queries,
        valid=torch.ones(B, L, dtype=torch.bool),
        scaling=D**-0.5,
    )


@pytest.fixture
def make_ctx():
    """Factory of random :class:`LayerContext` objects (see ``_make_ctx``)."""
    return _make_ctx
