"""Independent requests over one shared context (SCBench's multi-request mode): the context is compressed once,
each question is answered from its own fork of it — no earlier question or answer in view — and scored per
request (``turn1 … turnN`` in the order asked). Every cell of a sample asks the same requests, so the cells'
forks decode together as the rows of batched forward passes (:mod:`kvsqueeze.bench.batch`)."""

from __future__ import annotations

from kvsqueeze.bench import scoring
from kvsqueeze.bench.batch import forward_many, greedy_many
from kvsqueeze.bench.evaluators.base import Session, gold_ids
from kvsqueeze.bench.evaluators.batched import BatchedEvaluator, gold_logits_many, session_rows
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.prompts import prompt_ids, split_prompt


class MultiRequestEvaluator(BatchedEvaluator):
    kind = "multirequest"

    def __init__(self, model, tokenizer, sample, query_aware: bool):
        super().__init__(model, tokenizer, sample, False)  # the context is shared: compressed before any request
        self.requests = []
        for q in sample.questions:
            context, question = prompt_ids(tokenizer, sample.context, q.text, q.answer_prefix)
            tail = split_prompt(tokenizer, sample.context, q.text, q.answer_prefix)[1]
            self.requests.append((question, gold_ids(tokenizer, tail, q), q))
        self.context_ids = context  # the same for every request: the prompt splits where the context ends

    def decode(self, cache: CompressedCache) -> dict:
        return self.decode_many([cache])[0]

    def decode_many(self, caches: list[CompressedCache]) -> list[dict]:
        n = len(caches)
        sessions = [Session([], []) for _ in caches]
        requests: list[list[CompressedCache]] = [[] for _ in caches]
        for question, gold, q in self.requests:
            forks = [cache.fork() for cache in caches]
            firsts = forward_many(self.model, forks, question, keep=1)[:, -1]
            golds = gold_logits_many(self.model, forks, firsts, gold, fork=True)
            outs = greedy_many(self.model, forks, list(firsts), [q.max_new_tokens] * n, self.eos)
            for i, (fork, out) in enumerate(zip(forks, outs, strict=True)):
                requests[i].append(fork)
                sessions[i].add(self.answer_text(out.tokens), q, scoring.gold_loglik(golds[i], gold[0]), out)
        return session_rows(self.sample, sessions, requests)
