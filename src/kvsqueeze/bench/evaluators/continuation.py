"""Continuation of a text (``ppl`` on Austen, ``fidelity`` on essays): the continuation teacher-forced after the
compressed prefix; perplexity, and KL / top-1 agreement with the full cache."""

from __future__ import annotations

import torch

from kvsqueeze.bench import scoring
from kvsqueeze.bench.evaluators.batched import BatchedEvaluator
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.prompts import ids


class ContinuationEvaluator(BatchedEvaluator):
    kind = "continuation"
    fork_for_gold = False  # nothing decodes after the teacher-forced continuation

    def __init__(self, model, tokenizer, sample, query_aware: bool):
        super().__init__(model, tokenizer, sample, query_aware)
        self.context_ids = torch.tensor([list(tokenizer.encode(sample.context))], dtype=torch.long)
        self.gold_ids = ids(tokenizer, sample.continuation)

    def rows(self, caches: list[CompressedCache], firsts: list[torch.Tensor], golds: list[torch.Tensor]) -> list[dict]:
        targets = self.gold_ids[0]
        rows = []
        for logits in golds:
            scores = {**scoring.perplexity(logits, targets), **scoring.fidelity(self.reference(), logits)}
            scores["score"] = scores["ppl"] if self.sample.task == "ppl" else scores["kl"]
            rows.append({"scores": scores, "continuation_tokens": int(targets.numel())})
        return rows
