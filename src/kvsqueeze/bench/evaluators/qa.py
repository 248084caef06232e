"""Question answering over a context (NIAH, RULER-style tasks, ``file:``, LongBench …): greedy answer, string or
benchmark metric score, gold log-likelihood and fidelity to the full cache."""

from __future__ import annotations

import torch

from kvsqueeze.bench import scoring
from kvsqueeze.bench.batch import greedy_many
from kvsqueeze.bench.capture import Decoded
from kvsqueeze.bench.evaluators.base import gold_ids
from kvsqueeze.bench.evaluators.batched import BatchedEvaluator
from kvsqueeze.bench.tasks.base import Question
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.prompts import prompt_ids, split_prompt


class QAEvaluator(BatchedEvaluator):
    kind = "qa"

    def __init__(self, model, tokenizer, sample, query_aware: bool):
        super().__init__(model, tokenizer, sample, query_aware)
        q = sample.questions[0]
        self.context_ids, self.question_ids = prompt_ids(tokenizer, sample.context, q.text, q.answer_prefix)
        self.gold_ids = gold_ids(tokenizer, split_prompt(tokenizer, sample.context, q.text, q.answer_prefix)[1], q)

    def stop_when_found(self, q: Question):
        def done(tokens: list[int]) -> bool:  # the score can no longer change once every answer is out
            return scoring.all_found(self.tokenizer.decode(tokens, skip_special_tokens=True), q.answers)

        if q.metric not in ("all", "part"):  # F1, ROUGE …: more text changes the score; decode as the benchmark does
            return lambda tokens: False
        return done

    def row(self, gold: torch.Tensor, out: Decoded) -> dict:
        q = self.sample.questions[0]
        scores = scoring.gold_loglik(gold, self.gold_ids[0])
        scores.update({f"{k}_gold": v for k, v in scoring.fidelity(self.reference(), gold).items()})
        text = self.tokenizer.decode(out.tokens, skip_special_tokens=True).strip()
        scores["score"] = scoring.match(text, q.answers, q.metric, q.choices)
        return {
            "scores": scores,
            "output": text,
            "expected": list(q.answers),
            "new_tokens": len(out.tokens),
            "decode_seconds": out.seconds,
            "decode_tokens_per_second": out.tokens_per_second,
        }

    def rows(self, caches: list[CompressedCache], firsts: list[torch.Tensor], golds: list[torch.Tensor]) -> list[dict]:
        q = self.sample.questions[0]
        n = len(caches)
        outs = greedy_many(self.model, caches, firsts, [q.max_new_tokens] * n, self.eos, [self.stop_when_found(q)] * n)
        rows = [self.row(g, o) for g, o in zip(golds, outs, strict=True)]
        if n > 1:
            for row in rows:  # decode time is shared by the batch: its tok/s is no per-method speed (see `speed`)
                row["decode_tokens_per_second"] = None
        return rows
