"""Speed: the live path — prefill with compression inside the forward pass, then exactly ``max_new_tokens`` greedy
steps — timed, with the bytes the cache's tensors hold at the end and at their peak (storage bytes, every device),
and on CUDA the device's peak allocated memory over the cell (reset per cell)."""

from __future__ import annotations

import time

import torch

from kvsqueeze.bench import scoring
from kvsqueeze.bench.capture import forward, greedy
from kvsqueeze.bench.evaluators.base import Cell, Evaluator
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.prompts import prompt_ids


class DevicePeak:
    """Peak memory allocated on a CUDA device while the block runs (reset on entry; ``None`` on other devices)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))


class SpeedEvaluator(Evaluator):
    kind = "speed"

    def __init__(self, model, tokenizer, sample, query_aware: bool):
        super().__init__(model, tokenizer, sample, query_aware)
        q = sample.questions[0]
        self.context_ids, self.question_ids = prompt_ids(tokenizer, sample.context, q.text, q.answer_prefix)

    def evaluate(self, cell: Cell) -> dict:
        q = self.sample.questions[0]
        ids = torch.cat([self.context_ids, self.question_ids], dim=-1)
        with DevicePeak(self.model.device) as device_peak:
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
            "peak_cache_bytes": max(stats["peak_cache_bytes"], stats["cache_bytes"]),
            "hot_bytes": stats["hot_bytes"],  # at the end (retrieval: summaries, window; the cold tier apart)
            "cold_bytes": stats["cold_bytes"],
            "fetched_bytes_per_token": stats["fetched_bytes_per_token"],
            "fetched_bytes_per_step": stats["fetched_bytes_per_step"],
            "tokens_compressed": int(ids.shape[-1]),
            "tokens_kept_mean": stats["tokens_kept_mean"],
            "prompt_tokens": int(ids.shape[-1]),
            "device": str(self.model.device),
            "gpu_peak_bytes": device_peak.peak,  # CUDA: torch.cuda.max_memory_allocated over the cell (model included)
        }
