"""Several questions asked in turn of one compressed context; scored per turn. The conversation holds the earlier
questions and either the model's own answers (``Sample.history == "model"``: each cell decodes alone, its history
its own) or the gold answers (``"gold"``, SCBench's multi-turn default: every cell's conversation is the same text,
so the cells decode together as the rows of batched forward passes, :mod:`kvsqueeze.bench.batch`)."""

from __future__ import annotations

import torch

from kvsqueeze.bench import scoring
from kvsqueeze.bench.batch import forward_many, greedy_many
from kvsqueeze.bench.capture import forward, greedy
from kvsqueeze.bench.evaluators.base import Session, gold_ids
from kvsqueeze.bench.evaluators.batched import BatchedEvaluator, gold_logits_many, session_rows
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.prompts import chat, ids, split_prompt


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def new_text(text: str, in_cache: str) -> str:
    """What of the conversation's ``text`` the cache does not hold yet (it holds ``in_cache``)."""
    return text[len(in_cache) :] if text.startswith(in_cache) else text[common_prefix(text, in_cache) :]


class MultiturnEvaluator(BatchedEvaluator):
    kind = "multiturn"

    def __init__(self, model, tokenizer, sample, query_aware: bool):
        super().__init__(model, tokenizer, sample, query_aware)
        q = sample.questions[0]
        self.head, _ = split_prompt(tokenizer, sample.context, q.text, q.answer_prefix)  # the first turn's context
        self.context_ids = ids(tokenizer, self.head)
        self.gold_history = sample.history == "gold"
        if not self.gold_history:
            self.batch_rows = 1  # each cell's conversation holds its own answers: no two cells share a length

    def prompt(self, answers: list[str]) -> str:
        """The conversation's text up to turn ``len(answers)``'s answer: the earlier questions with ``answers``."""
        messages: list[dict] = []
        for t, q in enumerate(self.sample.questions[: len(answers) + 1]):
            messages.append({"role": "user", "content": f"{self.sample.context}\n\n{q.text}" if t == 0 else q.text})
            if t < len(answers):
                messages.append({"role": "assistant", "content": q.answer_prefix + answers[t]})
        suffix = " " if not getattr(self.tokenizer, "chat_template", None) else ""
        return chat(self.tokenizer, messages) + suffix + self.sample.questions[len(answers)].answer_prefix

    def decode(self, cache: CompressedCache) -> dict:
        if self.gold_history:
            return self.decode_many([cache])[0]
        tok = self.tokenizer
        in_cache, answers = self.head, []
        session = Session([], [])
        for q in self.sample.questions:
            text = self.prompt(answers)
            new = new_text(text, in_cache)
            first = forward(self.model, cache, ids(tok, new), keep=1)[-1]
            gold = gold_ids(tok, new, q)
            ll = scoring.gold_loglik(self.gold_logits(cache, first, gold), gold[0])
            out = greedy(self.model, cache, first, q.max_new_tokens, self.eos)
            answer = self.answer_text(out.tokens)
            if out.tokens and out.tokens[-1] not in self.eos:  # the last token is not in the cache yet
                forward(self.model, cache, torch.tensor([[out.tokens[-1]]]), keep=1)
            in_cache = text + answer
            answers.append(answer)
            session.add(answer, q, ll, out)
        return session.row(self.sample)

    def decode_many(self, caches: list[CompressedCache]) -> list[dict]:
        """Gold history: each turn appends the new text to every cache, answers on forks (the conversation goes on
        with the gold answer, teacher-forced into every cache: its logits are the gold log-likelihood)."""
        tok, n = self.tokenizer, len(caches)
        in_cache = self.head
        sessions = [Session([], []) for _ in caches]
        answered: list[list[CompressedCache]] = [[cache] for cache in caches]
        answers: list[str] = []
        for q in self.sample.questions:
            text = self.prompt(answers)
            new = new_text(text, in_cache)
            firsts = forward_many(self.model, caches, ids(tok, new), keep=1)[:, -1]
            gold = gold_ids(tok, new, q)
            forks = [cache.fork() for cache in caches]
            outs = greedy_many(self.model, forks, list(firsts), [q.max_new_tokens] * n, self.eos)
            golds = gold_logits_many(self.model, caches, firsts, gold, fork=False)
            for i, (fork, out) in enumerate(zip(forks, outs, strict=True)):
                answered[i].append(fork)
                sessions[i].add(self.answer_text(out.tokens), q, scoring.gold_loglik(golds[i], gold[0]), out)
            answers.append(tok.decode(gold[0]))
            in_cache = text + answers[-1]
        return session_rows(self.sample, sessions, answered)
