"""Independent requests over one shared context (SCBench's multi-request mode): the context is compressed once,
each question is answered from its own fork of it — no earlier question or answer in view — and scored per
request (``turn1 … turnN`` in the order asked). Every cell of a sample asks the same requests, so the cells'
forks decode together as the rows of batched forward passes (:mod:`kvsqueeze.bench.batch`)."""

from __future__ import annotations

import torch

from kvsqueeze.bench import scoring
from kvsqueeze.bench.batch import forward_many, greedy_many
from kvsqueeze.bench.evaluators.base import Session, fetch_fields, gold_ids
from kvsqueeze.bench.evaluators.batched import BatchedEvaluator
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.prompts import prompt_ids, split_prompt


def session_rows(evaluator, sessions: list[Session], caches_of_rows: list[list[CompressedCache]]) -> list[dict]:
    """One result row per session; the decode time of a batch of several rows is shared, so no tok/s."""
    rows = []
    for session, caches in zip(sessions, caches_of_rows, strict=True):
        row = {**session.row(evaluator.sample), **fetch_fields(*caches)}
        if len(sessions) > 1:
            row["decode_tokens_per_second"] = None
        rows.append(row)
    return rows


def gold_logits_many(model, caches: list[CompressedCache], firsts: torch.Tensor, gold: torch.Tensor, fork: bool):
    """Each row's logits predicting each gold token (``[B, len(gold), V]``); teacher forcing runs on forks of
    ``caches`` if ``fork``, else it appends the gold to them."""
    if gold.shape[-1] <= 1 and fork:
        return firsts[:, None]
    targets = [c.fork() for c in caches] if fork else caches
    rest = forward_many(model, targets, gold if not fork else gold[:, :-1])
    return torch.cat([firsts[:, None], rest[:, : gold.shape[-1] - 1]], dim=1)


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
                answer = self.tokenizer.decode([t for t in out.tokens if t not in self.eos], skip_special_tokens=True)
                sessions[i].add(answer, q, scoring.gold_loglik(golds[i], gold[0]), out)
        return session_rows(self, sessions, requests)
