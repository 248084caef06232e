"""``kvsqueeze demo``: a word needle in essays, answered by the full cache and by compressed caches, in both modes.

- query-agnostic: the context alone is compressed (before the question is known), then the question is asked;
- query-aware: the whole prompt, question included, is compressed (what SnapKV's paper evaluates).

The needle is a *word* (a made-up password): SmolLM2 copies numbers digit by digit through induction heads that
the question never attends to, so a number needle measures that quirk more than retrieval (DESIGN.md). The
default ratio and context length were chosen by measurement so that the table shows what compression really
keeps and loses on this model; ``kvsqueeze bench`` measures it properly (many samples, depths, ratios).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvsqueeze.data import haystack, insert_needle
from kvsqueeze.pipeline import answer

NEEDLE = "The password to the old lighthouse is marmalade."
QUESTION = "What is the password to the old lighthouse? Answer with one word."
EXPECTED = "marmalade"
# one eviction method, one eviction + 4-bit codec composite; a retrieval (tier) method joins this list once the
# tier axis has one (it keeps every token and fetches per step, so it belongs beside these two)
DEMO_METHODS = ("snapkv", "snapkv+kivi:bits=4")
MODES = ("query-agnostic", "query-aware")


@dataclass(frozen=True)
class DemoRow:
    mode: str  # "" for the full cache (the same in both modes)
    method: str
    answer: str
    correct: bool
    cache_bytes: int
    full_cache_bytes: int
    tokens_per_second: float

    @property
    def times_smaller(self) -> float:
        return self.full_cache_bytes / max(self.cache_bytes, 1)


def run_demo(
    model,
    tokenizer,
    *,
    context_tokens: int = 2000,
    ratio: float = 0.5,
    methods: tuple[str, ...] | list[str] = DEMO_METHODS,
    depth: float = 0.5,
    max_new_tokens: int = 12,
    on_step: Callable[[str], None] | None = None,
) -> list[DemoRow]:
    """The demo's rows: the full cache first, then every method in each mode."""
    context = insert_needle(haystack(tokenizer, context_tokens), NEEDLE, depth=depth)
    plan = [("", "none")] + [(mode, spec) for mode in MODES for spec in methods]
    rows = []
    for mode, spec in plan:
        if on_step is not None:
            on_step(f"{spec} ({mode})" if mode else "full cache")
        result = answer(
            model, tokenizer, spec, context, QUESTION, ratio=None if spec == "none" else ratio,
            query_aware=mode == "query-aware", max_new_tokens=max_new_tokens,
        )  # fmt: skip
        rows.append(
            DemoRow(
                mode=mode,
                method="full cache" if spec == "none" else spec,
                answer=" ".join(result.text.split()),
                correct=EXPECTED in result.text.lower(),
                cache_bytes=result.cache_bytes,
                full_cache_bytes=result.full_cache_bytes,
                tokens_per_second=result.decode_tokens_per_second,
            )
        )
    return rows
