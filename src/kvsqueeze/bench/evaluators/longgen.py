"""Long-generation fidelity (``longgen``) and decoding cost of a method, for decoding-time schedules.

``longgen``: generate ``n_tokens`` greedily with the full cache, then teacher-force that continuation through
a :class:`~kvsqueeze.core.cache.CompressedCache` under ``method`` one token at a time (so decoding schedules
recompress exactly as during generation) and compare each step's next-token distribution with the full
cache's: top-1 agreement and KL(full ‖ compressed). Also reports tokens held at the end, bytes, and decode
tokens/s of the compressed run relative to the full-cache run.
"""

from __future__ import annotations

import time

import torch

from kvsqueeze.bench.evaluators.base import Cell, Evaluator
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.compat import with_cache
from kvsqueeze.prompts import prompt_ids


def _teacher_forced(model, cache, prompt_ids: torch.Tensor, continuation: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Log-probs ``[n, V]`` predicting each continuation token (the prompt's last position first); decode seconds."""
    with torch.no_grad():
        out = model(input_ids=prompt_ids, **with_cache(model, cache), use_cache=True)
        logps = [out.logits[:, -1].float().log_softmax(-1)]
        start = time.perf_counter()
        for t in range(continuation.shape[1] - 1):
            out = model(input_ids=continuation[:, t : t + 1], **with_cache(model, cache), use_cache=True)
            logps.append(out.logits[:, -1].float().log_softmax(-1))
        seconds = time.perf_counter() - start
    return torch.cat(logps), seconds


def longgen(
    model,
    tokenizer,
    method: str,
    prompt: str | torch.Tensor,
    n_tokens: int = 1000,
    budget: int | None = None,
    ratio: float | None = None,
    reference: dict | None = None,
) -> dict:
    """Fidelity of ``method`` over an ``n_tokens`` greedy continuation of ``prompt`` generated with the full cache.

    Pass ``reference`` (the ``"reference"`` entry of an earlier result) to reuse the full-cache run.
    """
    ids = prompt if isinstance(prompt, torch.Tensor) else tokenizer(prompt, return_tensors="pt").input_ids
    if reference is None:
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=n_tokens, do_sample=False, min_new_tokens=n_tokens)
        continuation = gen[:, ids.shape[1] :]
        full_logps, full_s = _teacher_forced(model, CompressedCache(model, "none"), ids, continuation)
        reference = {"continuation": continuation, "logps": full_logps, "seconds": full_s}
    continuation, full_logps = reference["continuation"], reference["logps"]
    cache = CompressedCache(model, method, budget=budget, ratio=ratio, tokenizer=tokenizer)
    logps, seconds = _teacher_forced(model, cache, ids, continuation)
    n = continuation.shape[1]
    kl = (full_logps.exp() * (full_logps - logps)).sum(-1)
    agree = (logps.argmax(-1) == continuation[0]).float()
    stats = cache.stats()
    steps = max(n - 1, 1)
    return {
        "method": method,
        "prompt_tokens": ids.shape[1],
        "generated_tokens": n,
        "top1_agreement": float(agree.mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "tokens_held_end": stats["tokens_kept_mean"],
        "cache_bytes": stats["cache_bytes"],
        "full_cache_bytes": stats["full_cache_bytes"],
        "hot_bytes": stats["hot_bytes"],
        "cold_bytes": stats["cold_bytes"],
        "fetched_bytes_per_token": stats["fetched_bytes_per_token"],
        "fetched_bytes_per_step": stats["fetched_bytes_per_step"],
        "decode_tok_s": steps / seconds,
        "full_decode_tok_s": steps / reference["seconds"],
        "relative_speed": reference["seconds"] / seconds,
        "reference": reference,
    }


class LonggenEvaluator(Evaluator):
    """Teacher-force the full cache's greedy N-token generation under each cell (:func:`longgen`); the full cache's
    run is the reference every other cell reuses."""

    kind = "longgen"

    def __init__(self, model, tokenizer, sample, query_aware: bool):
        super().__init__(model, tokenizer, sample, query_aware)
        q = sample.questions[0]
        self.context_ids, self.question_ids = prompt_ids(tokenizer, sample.context, q.text, q.answer_prefix)
        self.full: dict | None = None

    def evaluate(self, cell: Cell) -> dict:
        n_tokens = self.sample.questions[0].max_new_tokens
        ids = torch.cat([self.context_ids, self.question_ids], dim=-1).to(self.model.device)
        if self.full is None:
            self.full = longgen(self.model, self.tokenizer, "none", ids, n_tokens=n_tokens)
        if cell.method == "none":
            res = self.full
        else:
            res = longgen(self.model, self.tokenizer, cell.method, ids, n_tokens=n_tokens, ratio=cell.ratio,
                          reference=self.full["reference"])  # fmt: skip
        n, prompt = int(res["generated_tokens"]), int(res["prompt_tokens"])
        top1 = res["top1_agreement"]
        return {
            "scores": {"score": top1, "top1": top1, "kl": res["kl_mean"], "kl_max": res["kl_max"]},
            "cache_bytes": res["cache_bytes"],
            "full_bytes": res["full_cache_bytes"],
            "hot_bytes": res["hot_bytes"],
            "cold_bytes": res["cold_bytes"],
            "fetched_bytes_per_token": res["fetched_bytes_per_token"],
            "fetched_bytes_per_step": res["fetched_bytes_per_step"],
            "tokens_compressed": prompt + n - 1,  # what the full cache holds at the end
            "tokens_kept_mean": res["tokens_held_end"],
            "prompt_tokens": prompt,
            "generated_tokens": n,
            "decode_tokens_per_second": res["decode_tok_s"],
            "full_decode_tokens_per_second": res["full_decode_tok_s"],
            "decode_vs_full": res["relative_speed"],
        }
