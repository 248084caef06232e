"""Several questions asked in turn of one compressed context, earlier answers kept in the conversation; scored per
turn."""

from __future__ import annotations

import torch

from kvsqueeze.bench import scoring
from kvsqueeze.bench.capture import forward, greedy
from kvsqueeze.bench.evaluators.base import Evaluator, Session, gold_ids
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.prompts import chat, ids, split_prompt


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class MultiturnEvaluator(Evaluator):
    kind = "multiturn"

    def __init__(self, model, tokenizer, sample, query_aware: bool):
        super().__init__(model, tokenizer, sample, query_aware)
        q = sample.questions[0]
        self.head, _ = split_prompt(tokenizer, sample.context, q.text, q.answer_prefix)  # the first turn's context
        self.context_ids = ids(tokenizer, self.head)

    def decode(self, cache: CompressedCache) -> dict:
        tok = self.tokenizer
        messages: list[dict] = []
        in_cache = self.head
        session = Session([], [])
        for t, q in enumerate(self.sample.questions):
            user = f"{self.sample.context}\n\n{q.text}" if t == 0 else q.text
            messages.append({"role": "user", "content": user})
            text = chat(tok, messages) + (" " if not getattr(tok, "chat_template", None) else "") + q.answer_prefix
            new = text[len(in_cache) :] if text.startswith(in_cache) else text[common_prefix(text, in_cache) :]
            first = forward(self.model, cache, ids(tok, new), keep=1)[-1]
            gold = gold_ids(tok, new, q)
            ll = scoring.gold_loglik(self.gold_logits(cache, first, gold), gold[0])
            out = greedy(self.model, cache, first, q.max_new_tokens, self.eos)
            answer_tokens = [x for x in out.tokens if x not in self.eos]
            answer = tok.decode(answer_tokens, skip_special_tokens=True)
            if out.tokens and out.tokens[-1] not in self.eos:  # the last token is not in the cache yet
                forward(self.model, cache, torch.tensor([[out.tokens[-1]]]), keep=1)
            in_cache = text + answer
            messages.append({"role": "assistant", "content": q.answer_prefix + answer})
            session.add(answer, q, ll, out)
        return session.row(self.sample)
