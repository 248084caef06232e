"""Policies: which tokens to keep (scorers and selection rules) and how budgets are split."""

from kvsqueeze.policies import baselines, h2o, keydiff, knorm, snapkv, streaming_llm, tova, uniform
from kvsqueeze.policies.base import Budget, LayerContext, Scorer, select, tokens_to_keep

__all__ = [
    "Budget",
    "LayerContext",
    "Scorer",
    "baselines",
    "h2o",
    "keydiff",
    "knorm",
    "select",
    "snapkv",
    "streaming_llm",
    "tokens_to_keep",
    "tova",
    "uniform",
]
