"""One evaluator per sample kind (``qa``, ``continuation``, ``multiturn``, ``multirequest``, ``longgen``, ``speed``,
``rag``, ``convqa``), all sharing one prompt builder with the Python API (:mod:`kvsqueeze.prompts`): one exact
prefill per sample, then one cache per (method, ratio) cell, one result row per cell."""

from __future__ import annotations

from kvsqueeze.bench.evaluators.base import Cell, Evaluator
from kvsqueeze.bench.evaluators.continuation import ContinuationEvaluator
from kvsqueeze.bench.evaluators.convqa import ConvQAEvaluator
from kvsqueeze.bench.evaluators.longgen import LonggenEvaluator, longgen
from kvsqueeze.bench.evaluators.multirequest import MultiRequestEvaluator
from kvsqueeze.bench.evaluators.multiturn import MultiturnEvaluator
from kvsqueeze.bench.evaluators.qa import QAEvaluator
from kvsqueeze.bench.evaluators.rag import RagEvaluator
from kvsqueeze.bench.evaluators.speed import SpeedEvaluator
from kvsqueeze.bench.tasks.base import Sample

EVALUATORS: dict[str, type[Evaluator]] = {
    e.kind: e
    for e in (
        QAEvaluator,
        ContinuationEvaluator,
        MultiturnEvaluator,
        LonggenEvaluator,
        SpeedEvaluator,
        RagEvaluator,
        MultiRequestEvaluator,
        ConvQAEvaluator,
    )
}


def evaluator_for(model, tokenizer, sample: Sample, query_aware: bool, store=None) -> Evaluator:
    """The evaluator of ``sample``'s kind (``store``: the sweep's chunk store, read by ``rag``)."""
    if sample.kind == "rag":
        return RagEvaluator(model, tokenizer, sample, query_aware, store=store)
    return EVALUATORS[sample.kind](model, tokenizer, sample, query_aware)


__all__ = ["EVALUATORS", "Cell", "Evaluator", "evaluator_for", "longgen"]
