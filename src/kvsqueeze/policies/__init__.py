"""Policies: which tokens to keep (scorers and selection rules) and how budgets are split."""

from kvsqueeze.policies import (
    adakv,
    baselines,
    cake,
    h2o,
    keydiff,
    knorm,
    kvmerger,
    lazyeviction,
    pyramidkv,
    razorattention,
    snapkv,
    streaming_llm,
    tova,
    triattention,
    uniform,
)
from kvsqueeze.policies.base import Budget, LayerContext, Scorer, select, tokens_to_keep

__all__ = [
    "Budget",
    "LayerContext",
    "Scorer",
    "adakv",
    "baselines",
    "cake",
    "h2o",
    "keydiff",
    "knorm",
    "kvmerger",
    "lazyeviction",
    "pyramidkv",
    "razorattention",
    "select",
    "snapkv",
    "streaming_llm",
    "tokens_to_keep",
    "tova",
    "triattention",
    "uniform",
]
