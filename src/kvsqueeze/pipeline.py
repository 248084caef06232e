"""Answer questions about a context through ``model.generate`` with a compressed cache, and time it.

``kvsqueeze.pipeline(model, tokenizer, method, ratio=…)`` is kvpress' pipeline for kvsqueeze: it compresses a
context once and answers a list of questions from it, each from a fork of the compressed context (the answer is
removed from the cache afterwards: the next question sees the context only). Two modes:

- query-agnostic (default): the context alone is prefilled and compressed, then every question is answered from
  a fork of that cache;
- query-aware: for each question, the whole prompt, question included, is prefilled and compressed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.compat import with_cache
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.prompts import prompt_ids
from kvsqueeze.validation import check_count


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
    check_count(max_new_tokens, "max_new_tokens")
    context_ids, question_ids = prompt_ids(tokenizer, context, question)
    full_ids = torch.cat([context_ids, question_ids], dim=-1).to(model.device)
    cache = cache or CompressedCache(model, method, ratio=ratio, budget=budget, tokenizer=tokenizer)
    compressed_part = full_ids if query_aware else context_ids.to(model.device)
    check_context(cache, compressed_part.shape[-1])
    prefill_seconds = 0.0
    if not query_aware:
        start = time.perf_counter()
        cache.prefill(model, compressed_part)
        prefill_seconds = time.perf_counter() - start
        cache = cache.fork()
    full_ids = generate_input(cache, full_ids, context_ids.shape[-1])
    clock = _StepClock()
    start = time.perf_counter()
    new = generate_greedy(model, tokenizer, full_ids, cache, max_new_tokens, clock)
    if query_aware and clock.stamps:
        prefill_seconds = clock.stamps[0] - start
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


class Pipeline:
    """Compress a context once, answer several questions from it (see the module docstring)."""

    def __init__(self, model, tokenizer, method: str = "snapkv", *, ratio=None, budget: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.method, self.ratio, self.budget = method, ratio, budget
        self._cache()  # validate the request now, in one line

    def __call__(
        self,
        context: str,
        question: str | None = None,
        questions: list[str] | None = None,
        *,
        answer_prefix: str = "",
        max_new_tokens: int = 32,
        query_aware: bool = False,
    ) -> dict:
        """``{"answer": str}`` for one ``question``, ``{"answers": [str, ...]}`` for ``questions``, with ``"stats"``
        (what the compressed context holds)."""
        if (question is None) == (questions is None):
            raise KVSqueezeError("give either question= or questions=[...]")
        check_count(max_new_tokens, "max_new_tokens")
        asked = [question] if question is not None else list(questions)
        if not asked or any(not isinstance(q, str) or not q.strip() for q in asked):
            raise KVSqueezeError("every question must be a non-empty string")
        answers, stats = [], None
        context_cache = None
        for q in asked:
            context_ids, question_ids = prompt_ids(self.tokenizer, context, q, answer_prefix)
            full_ids = torch.cat([context_ids, question_ids], dim=-1)
            if query_aware:
                cache = self._cache()
                check_context(cache, full_ids.shape[-1])
            else:
                if context_cache is None:
                    context_cache = self._cache()
                    check_context(context_cache, context_ids.shape[-1])
                    context_cache.prefill(self.model, context_ids)
                    stats = context_cache.stats()
                cache = context_cache.fork()
                full_ids = generate_input(cache, full_ids, context_ids.shape[-1])
                cache.expect(full_ids)
            out = generate_greedy(self.model, self.tokenizer, full_ids, cache, max_new_tokens)
            answers.append(self.tokenizer.decode(out, skip_special_tokens=True).strip())
            stats = stats if not query_aware else cache.stats()
        result = {"answer": answers[0]} if question is not None else {"answers": answers}
        result["stats"] = {k: v for k, v in stats.items() if k != "tokens_kept"}
        return result

    def _cache(self) -> CompressedCache:
        return CompressedCache(self.model, self.method, ratio=self.ratio, budget=self.budget, tokenizer=self.tokenizer)


def pipeline(model, tokenizer, method: str = "snapkv", *, ratio=None, budget: int | None = None) -> Pipeline:
    """A :class:`Pipeline`: ``pipeline(model, tok, "snapkv", ratio=0.5)(context, questions=[...])["answers"]``."""
    return Pipeline(model, tokenizer, method, ratio=ratio, budget=budget)


def generate_input(cache: CompressedCache, full_ids: torch.Tensor, context_length: int) -> torch.Tensor:
    """The ids ``generate`` is given after a compressed context: the prompt itself, or — for a cache whose kept keys
    were re-rotated (``prefill:rerotate``: it holds fewer positions than the context) — the question after as many
    context ids as the cache holds positions (``generate`` feeds only what lies beyond them)."""
    held = cache.get_seq_length()
    if held == 0 or held >= context_length:
        return full_ids
    cache.tokens = full_ids[:, :held].detach().cpu()
    return torch.cat([full_ids[:, :held], full_ids[:, context_length:]], dim=-1)


def check_context(cache: CompressedCache, length: int) -> None:
    """Refuse a compressed part no longer than the tokens the method always keeps."""
    protected = cache.method.scorer.protected(length) if cache.method.evicts else 0
    if cache.method.evicts and length <= protected:
        raise KVSqueezeError(
            f"context of {length} tokens is not longer than the {protected} tokens {cache.method.scorer.name} "
            "always keeps; give a longer context"
        )


def generate_greedy(model, tokenizer, full_ids: torch.Tensor, cache: CompressedCache, max_new_tokens: int,
                    clock=None) -> torch.Tensor:  # fmt: skip
    """Greedy new token ids of ``full_ids [1, L]`` with ``cache`` (which may already hold a prefix); ``clock`` (a
    stopping criterion) sees every step."""
    full_ids = full_ids.to(model.device)
    with torch.no_grad():
        out = model.generate(
            full_ids,
            attention_mask=torch.ones_like(full_ids),
            **with_cache(model, cache),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([clock] if clock is not None else []),
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, full_ids.shape[-1] :]
