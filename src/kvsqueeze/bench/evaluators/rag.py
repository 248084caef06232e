"""A retrieval-augmented question answered by a full recompute (cell ``none``) and by each reuse strategy
(cells ``reuse:SPEC``, :mod:`kvsqueeze.reuse.rag`): accuracy, KL to the full recompute over the gold answer, time
to first token and the fraction of context tokens computed for the request.

Chunk caches live in the sweep's store (``--store URL``; by default one in-process store per executor), so a
document met by an earlier sample is loaded, not encoded. Before a strategy is timed its chunks are put in the
store (untimed: "chunks in store"); its time to first token is building the cache from them plus prefilling the
question's tail, without the time spent storing boundary prefixes for later requests."""

from __future__ import annotations

import time

import torch

from kvsqueeze.bench import scoring
from kvsqueeze.bench.capture import forward, greedy
from kvsqueeze.bench.evaluators.base import Cell, Evaluator, attempt, fetch_fields, gold_ids, tier_fields
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.prompts import chat, segmented_prompt
from kvsqueeze.reuse.rag import ChunkCaches, Request, parse_reuse
from kvsqueeze.store import Store
from kvsqueeze.store import open as open_store

PREFIX = "reuse:"
WARM_UP = 256  # tokens of the untimed forward before a sample's first timed cell


class RagEvaluator(Evaluator):
    kind = "rag"

    def __init__(self, model, tokenizer, sample, query_aware: bool, store: Store | None = None):
        super().__init__(model, tokenizer, sample, False)  # reuse is question-agnostic by construction
        q = sample.questions[0]
        head, documents, tail = segmented_prompt(tokenizer, list(sample.documents), q.text, q.answer_prefix)
        self.request = Request(head, tuple(documents), tail)
        self.context_ids, self.question_ids = self.request.context_ids, tail
        prompt_end = chat(tokenizer, [{"role": "user", "content": q.text}]) + q.answer_prefix
        self.gold_ids = gold_ids(tokenizer, prompt_end, q)
        self.chunks = ChunkCaches(store if store is not None else open_store("memory://"), model)
        self.warmed = False

    def warm_up(self) -> None:
        """One untimed forward over the prompt's first ``WARM_UP`` tokens before this sample's first timed cell (the
        process's first forwards are slower: thread pools and allocator growth would be charged to whichever cell
        runs first)."""
        if not self.warmed:
            forward(self.model, CompressedCache(self.model, "none"), self.request.prompt_ids[:, :WARM_UP], keep=1)
            self.warmed = True

    def reference(self) -> torch.Tensor:
        if self._reference is None:
            self.recompute()
        return self._reference

    def recompute(self) -> tuple[CompressedCache, torch.Tensor, float]:
        """The full recompute of the whole prompt: (cache, first logits, seconds to the first token)."""
        cache = CompressedCache(self.model, "none")
        start = time.perf_counter()
        first = forward(self.model, cache, self.request.prompt_ids, keep=1)[-1]
        seconds = time.perf_counter() - start
        if self._reference is None:
            self._reference = self.gold_logits(cache, first, self.gold_ids)
        return cache, first, seconds

    def run(self, cell: Cell) -> dict:
        self.warm_up()
        start = time.perf_counter()
        context = self.request.context_ids.shape[-1]
        if cell.method == "none":
            cache, first, ttft = self.recompute()
            fields = {"recomputed_tokens": context}
        else:
            strategy = parse_reuse(cell.method.removeprefix(PREFIX))
            chunks = self.chunks
            hits, misses, encode, load = chunks.hits, chunks.misses, chunks.encode_seconds, chunks.load_seconds
            strategy.warm(self.request, chunks)
            warm_hits, warm_misses = chunks.hits - hits, chunks.misses - misses
            paused = chunks.pause
            begin = time.perf_counter()
            reused = strategy.build(self.model, self.request, chunks)
            first = forward(self.model, reused.cache, self.request.tail, keep=1)[-1]
            ttft = time.perf_counter() - begin - (chunks.pause - paused)
            cache = reused.cache
            fields = {
                "recomputed_tokens": reused.recomputed,
                "chunk_hits": warm_hits,  # chunks already stored by earlier samples (or workers)
                "chunk_misses": warm_misses,  # chunks this sample had to encode first
                "encode_seconds": chunks.encode_seconds - encode,
                "load_seconds": chunks.load_seconds - load,
            }
        cache_bytes, full_bytes, tiers = cache.nbytes(), cache.full_nbytes(), tier_fields(cache)
        gold = self.gold_logits(cache, first, self.gold_ids)
        q = self.sample.questions[0]
        refresh = getattr(strategy, "refresh", None) if cell.method != "none" else None
        token = int(first.argmax())
        if refresh is not None and token not in self.eos and q.max_new_tokens > 1:  # a decode-time stage (KVShare)
            nxt = refresh(self.model, cache, self.request, token)
            fields["decode_recomputed_tokens"] = int(strategy.refreshed.numel())
            out = greedy(self.model, cache, nxt, q.max_new_tokens - 1, self.eos)
            tokens = [token, *out.tokens]
        else:
            out = greedy(self.model, cache, first, q.max_new_tokens, self.eos)
            tokens = out.tokens
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        scores = scoring.gold_loglik(gold, self.gold_ids[0])
        scores.update({f"{k}_gold": v for k, v in scoring.fidelity(self.reference(), gold).items()})
        scores["score"] = scoring.match(text, q.answers, q.metric, q.choices)
        return {
            "scores": scores,
            "output": text,
            "expected": list(q.answers),
            "ttft_seconds": ttft,
            "recomputed_fraction": fields["recomputed_tokens"] / context,
            "context_tokens": context,
            "prompt_tokens": int(self.request.prompt_ids.shape[-1]),
            "cache_bytes": cache_bytes,
            "full_bytes": full_bytes,
            "bytes_per_token": cache_bytes / context,
            **tiers,
            **fetch_fields(cache),
            "decode_seconds": out.seconds,
            "cell_seconds": time.perf_counter() - start,
            **fields,
        }

    def run_all(self, cells: list[Cell]) -> list[dict | Exception]:
        return [attempt(self.run, cell) for cell in cells]
