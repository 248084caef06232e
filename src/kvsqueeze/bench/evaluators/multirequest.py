"""Independent requests over one shared context (SCBench's multi-request mode): the context is compressed once,
each question is answered from its own fork of it — no earlier question or answer in view — and scored per
request (``turn1 … turnN`` in the order asked)."""

from __future__ import annotations

from kvsqueeze.bench import scoring
from kvsqueeze.bench.capture import forward, greedy
from kvsqueeze.bench.evaluators.base import Evaluator, Session, fetch_fields, gold_ids
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.prompts import prompt_ids, split_prompt


class MultiRequestEvaluator(Evaluator):
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
        session = Session([], [])
        requests = []
        for question, gold, q in self.requests:
            request = cache.fork()
            requests.append(request)
            first = forward(self.model, request, question, keep=1)[-1]
            ll = scoring.gold_loglik(self.gold_logits(request, first, gold), gold[0])
            out = greedy(self.model, request, first, q.max_new_tokens, self.eos)
            answer = self.tokenizer.decode([t for t in out.tokens if t not in self.eos], skip_special_tokens=True)
            session.add(answer, q, ll, out)
        return {**session.row(self.sample), **fetch_fields(*requests)}
