"""Long conversational QA (``convqa``): the dialogue is the context, each question is asked after it from its own
fork (independent requests), scored per question (``turn1 … turnN``).

Every method compresses the rendered dialogue from the sample's one captured prefill (post-prefill eviction, as
the EpiCache paper's baselines). ``epicache`` cells build an :class:`~kvsqueeze.policies.epicache.EpiCache` live
instead: episodes of the dialogue, one block-wise compressed cache each at the cell's ratio; each question is
routed to its episode and answered from a fork of that cache. Its row reports the bytes of one episode's cache
(what a question reads: ``cache_bytes``), of all of them (``episodes_bytes``), the block-wise prefill's peak
(``peak_cache_bytes``) and the episode each question went to (``routed``).
"""

from __future__ import annotations

import time

import torch

from kvsqueeze.bench import scoring
from kvsqueeze.bench.capture import forward, greedy
from kvsqueeze.bench.evaluators.base import Cell, Evaluator, Session, gold_ids
from kvsqueeze.bench.tasks.convqa import messages_of
from kvsqueeze.conversation import question_text, render
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policies.epicache import EpiCache
from kvsqueeze.prompts import ids
from kvsqueeze.spec import parse_method


class ConvQAEvaluator(Evaluator):
    kind = "convqa"

    def __init__(self, model, tokenizer, sample, query_aware: bool):
        super().__init__(model, tokenizer, sample, False)  # the questions come after the history
        self.messages = messages_of(sample)
        self.context_ids = torch.tensor([[t for m in render(tokenizer, self.messages) for t in m]])
        self.requests = []
        for q in sample.questions:
            text = question_text(tokenizer, self.messages, q.text, q.answer_prefix)
            self.requests.append((ids(tokenizer, text), gold_ids(tokenizer, text, q), q))

    def ask(self, cache: CompressedCache, question, gold, q, session: Session) -> None:
        first = forward(self.model, cache, question, keep=1)[-1]
        ll = scoring.gold_loglik(self.gold_logits(cache, first, gold), gold[0])
        out = greedy(self.model, cache, first, q.max_new_tokens, self.eos)
        session.add(self.answer_text(out.tokens), q, ll, out)

    def decode(self, cache: CompressedCache) -> dict:
        session = Session([], [])
        for question, gold, q in self.requests:
            self.ask(cache.fork(), question, gold, q, session)
        return session.row(self.sample)

    def evaluate(self, cell: Cell) -> dict:
        method = parse_method(cell.method) if cell.method != "none" else None
        if method is None or method.scorer.name != "epicache":
            return super().evaluate(cell)
        if cell.ratio is None:
            raise KVSqueezeError("epicache runs at a ratio: give --ratios")
        start = time.perf_counter()
        epi = EpiCache(self.model, self.tokenizer, ratio=cell.ratio, kernel=method.scorer.kernel)
        epi.prefill(self.messages)
        built = time.perf_counter() - start
        session, routed = Session([], []), []
        for question, gold, q in self.requests:
            e = epi.route(q.text)
            routed.append(e)
            self.ask(epi.episodes[e].cache.fork(), question, gold, q, session)
        caches = [e.cache for e in epi.episodes]
        fields = self.cache_fields(caches[0])
        fields.update(
            cache_bytes=sum(c.nbytes() for c in caches) // len(caches),
            episodes_bytes=epi.nbytes(),
            episodes=len(caches),
            peak_cache_bytes=epi.peak_bytes,
            compression_seconds=built,
            prefill_seconds=built,
            layer_budgets=epi.layer_budgets,
            routed=routed,
        )
        return {**fields, **session.row(self.sample)}
