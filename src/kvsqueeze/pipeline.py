"""Answer a question about a context through ``model.generate`` with a compressed cache, and time it.

Two modes:

- query-agnostic (default): the context alone is prefilled and compressed, then the question is answered from
  a fork of that cache (so several questions can share one compressed context);
- query-aware: the whole prompt, question included, is prefilled and compressed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.prompts import prompt_ids


class _StepClock(StoppingCriteria):
    """Records the time after every forward pass of ``generate`` (never stops generation)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class Answer:
    text: str
    method: str
    ratio: float | None
    budget: int | None
    dtype: str
    tokens_total: int
    tokens_kept: float
    cache_bytes: int
    full_cache_bytes: int
    prefill_seconds: float
    compression_seconds: float
    decode_tokens_per_second: float
    new_tokens: int
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out.update(self.extra)
        return out


def answer(
    model,
    tokenizer,
    method: str,
    context: str,
    question: str,
    *,
    ratio: float | None = None,
    budget: int | None = None,
    query_aware: bool = False,
    max_new_tokens: int = 32,
    cache: CompressedCache | None = None,
) -> Answer:
    """Generate an answer with ``method`` and report what the cache held and how fast it ran."""
    context_ids, question_ids = prompt_ids(tokenizer, context, question)
    full_ids = torch.cat([context_ids, question_ids], dim=-1).to(model.device)
    cache = cache or CompressedCache(model, method, ratio=ratio, budget=budget)
    compressed_part = full_ids if query_aware else context_ids.to(model.device)
    protected = cache.method.scorer.protected(compressed_part.shape[-1]) if cache.method.evicts else 0
    if cache.method.evicts and compressed_part.shape[-1] <= protected:
        raise KVSqueezeError(
            f"context of {compressed_part.shape[-1]} tokens is not longer than the {protected} tokens "
            f"{cache.method.scorer.name} always keeps; give a longer context"
        )
    prefill_seconds = 0.0
    if not query_aware:
        start = time.perf_counter()
        cache.prefill(model, compressed_part)
        prefill_seconds = time.perf_counter() - start
        cache = cache.fork()
    clock = _StepClock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            full_ids,
            attention_mask=torch.ones_like(full_ids),
            past_key_values=cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([clock]),
            pad_token_id=tokenizer.pad_token_id,
        )
    if query_aware and clock.stamps:
        prefill_seconds = clock.stamps[0] - start
    new = out[0, full_ids.shape[-1] :]
    steps = len(clock.stamps) - 1
    decode_rate = steps / (clock.stamps[-1] - clock.stamps[0]) if steps > 0 else 0.0
    stats = cache.stats()
    return Answer(
        text=tokenizer.decode(new, skip_special_tokens=True).strip(),
        method=cache.method.spec(),
        ratio=cache.ratio,
        budget=cache.budget,
        dtype=str(model.dtype).removeprefix("torch."),
        tokens_total=stats["tokens_seen"],
        tokens_kept=stats["tokens_kept_mean"],
        cache_bytes=stats["cache_bytes"],
        full_cache_bytes=stats["full_cache_bytes"],
        prefill_seconds=prefill_seconds,
        compression_seconds=cache.compression_seconds,
        decode_tokens_per_second=decode_rate,
        new_tokens=int(new.shape[-1]),
    )
