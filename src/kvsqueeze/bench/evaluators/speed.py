"""Speed: the live path — prefill with compression inside the forward pass, then exactly ``max_new_tokens`` greedy
steps — timed, with the bytes the cache holds at the end and at its peak during the prefill."""

from __future__ import annotations

import os
import threading
import time

import torch

from kvsqueeze.bench import scoring
from kvsqueeze.bench.capture import forward, greedy
from kvsqueeze.bench.evaluators.base import Cell, Evaluator
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.prompts import prompt_ids


class RssPeak:
    """Peak resident set size of this process while the block runs (Linux /proc; 0 elsewhere)."""

    def __enter__(self):
        self.base = self.peak = self.rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def poll(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.rss())


class SpeedEvaluator(Evaluator):
    kind = "speed"

    def __init__(self, model, tokenizer, sample, query_aware: bool):
        super().__init__(model, tokenizer, sample, query_aware)
        q = sample.questions[0]
        self.context_ids, self.question_ids = prompt_ids(tokenizer, sample.context, q.text, q.answer_prefix)

    def evaluate(self, cell: Cell) -> dict:
        q = self.sample.questions[0]
        ids = torch.cat([self.context_ids, self.question_ids], dim=-1)
        with RssPeak() as rss:
            cache = CompressedCache(self.model, cell.method, ratio=cell.ratio, tokenizer=self.tokenizer)
            start = time.perf_counter()
            with torch.no_grad():
                first = forward(self.model, cache, ids, keep=1)[-1]
            prefill = time.perf_counter() - start
            out = greedy(self.model, cache, first, q.max_new_tokens, eos=set())
        stats = cache.stats()
        text = self.tokenizer.decode(out.tokens, skip_special_tokens=True)
        return {
            "scores": {"score": scoring.match(text, q.answers, q.metric, q.choices)},
            "output": text.strip(),
            "expected": list(q.answers),
            "prefill_seconds": prefill,
            "compression_seconds": cache.compression_seconds,
            "decode_seconds": out.seconds,
            "decode_tokens_per_second": out.tokens_per_second,
            "new_tokens": len(out.tokens),
            "cache_bytes": stats["cache_bytes"],
            "full_bytes": stats["full_cache_bytes"],
            "peak_cache_bytes": stats["peak_cache_bytes"],
            "tokens_compressed": int(ids.shape[-1]),
            "tokens_kept_mean": stats["tokens_kept_mean"],
            "prompt_tokens": int(ids.shape[-1]),
            "peak_rss_bytes": rss.peak,
            "rss_delta_bytes": rss.peak - rss.base,
        }
