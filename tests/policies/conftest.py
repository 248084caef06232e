"""Shared helpers for the budget / head-selection tests: a tiny random Llama and hand-made contexts."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.core.context import LayerContext
from tests.conftest import tiny_model as build_tiny_model


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_model("llama")


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
