"""``kvsqueeze demo``: a word needle in essays, answered by the full cache and by compressed caches, in both modes.

- query-agnostic: the context alone is compressed (before the question is known), then the question is asked;
- query-aware: the whole prompt, question included, is compressed (what SnapKV's paper evaluates).

The needle is a *word* (RULER's "special magic word" sentence with a made-up value): SmolLM2 copies numbers
digit by digit through induction heads that the question never attends to, so a number needle measures that quirk
more than retrieval (DESIGN.md). The sample runs through the benchmark's evaluator (``kvsqueeze.bench.evaluate``):
one exact prefill per mode, each method compressed from it, greedy decoding after the answer prefix; bytes are the
storage each cache holds.
The default ratio and context length were chosen by measurement so that the table shows what compression
really keeps and loses on this model; ``kvsqueeze bench`` measures it properly (many samples, depths, ratios).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvsqueeze.data import haystack, insert_needle

# RULER's needle wording (the niah task's), with a made-up word as the value
NEEDLE = "One of the special magic words for the old lighthouse is: marmalade."
QUESTION = "What is the special magic word for the old lighthouse mentioned in the provided text?"
ANSWER_PREFIX = "The special magic word for the old lighthouse mentioned in the provided text is"
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
    context_tokens: int = 1000,
    ratio: float = 0.5,
    methods: tuple[str, ...] | list[str] = DEMO_METHODS,
    depth: float = 0.5,
    max_new_tokens: int = 8,
    on_step: Callable[[str], None] | None = None,
) -> list[DemoRow]:
    """The demo's rows: the full cache first, then every method in each mode."""
    from kvsqueeze.bench.evaluators import Cell, evaluator_for
    from kvsqueeze.bench.tasks.base import Question, Sample
    from kvsqueeze.spec import parse_method

    context = insert_needle(haystack(tokenizer, context_tokens), NEEDLE, depth=depth)
    question = Question(QUESTION, (EXPECTED,), ANSWER_PREFIX, max_new_tokens=max_new_tokens)
    sample = Sample("demo", "0", "qa", context, (question,))
    plan = [("", Cell("none", None))] + [(m, Cell(parse_method(s).spec(), ratio)) for m in MODES for s in methods]
    evaluators = {mode: evaluator_for(model, tokenizer, sample, query_aware=mode == "query-aware") for mode in MODES}
    rows = []
    for mode, cell in plan:
        if on_step is not None:
            on_step(f"{cell.method} ({mode})" if mode else "full cache")
        result = evaluators[mode or MODES[0]].run(cell)
        rows.append(
            DemoRow(
                mode=mode,
                method="full cache" if cell.method == "none" else cell.method,
                answer=" ".join(str(result["output"]).split()),
                correct=result["scores"]["score"] == 1.0,
                cache_bytes=int(result["cache_bytes"]),
                full_cache_bytes=int(result["full_bytes"]),
                tokens_per_second=float(result["decode_tokens_per_second"] or 0.0),
            )
        )
    return rows
