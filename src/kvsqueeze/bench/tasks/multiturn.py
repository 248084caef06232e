"""``multiturn``: one compressed context, several questions answered in sequence (the shared-context, multi-turn
mode of SCBench: Li et al., "SCBench: A KV Cache-Centric Analysis of Long-Context Methods", arXiv:2412.10319).

The context is an essay haystack with ``TURNS`` needles (distinct keys, numbers or words as in ``niah``) at
seeded depths; values alternate between numbers (even samples) and words (odd samples). Options:
``multiturn:N`` asks ``N`` questions (``N`` needles) per context instead of ``TURNS``; ``multiturn:words`` /
``multiturn:numbers`` fix the kind of value for every sample; ``multiturn:N-words`` both. Without an option the
samples are those of earlier versions, byte for byte.

The context is prefilled and compressed once (always query-agnostic: no question is known yet);
turn ``t`` appends question ``t`` (asking for one key's value) to the conversation, which already holds the
earlier questions and the model's own answers, and generates. Each turn is scored with ``string_match_all`` and
the gold log-likelihood (on a fork of the conversation cache, so scoring never alters the conversation);
the row reports the mean over turns and every turn's score.
"""

from __future__ import annotations

from kvsqueeze.bench.tasks.base import Question, Sample, rng_for
from kvsqueeze.bench.tasks.niah import insert_sentences, needle_sentence
from kvsqueeze.bench.text import essay_haystack, vocabulary
from kvsqueeze.errors import KVSqueezeError

TURNS = 3  # questions per context without an option
MAX_TURNS = 16
KINDS = ("numbers", "words")


def parse_option(option: str | None) -> tuple[int, str | None]:
    """``multiturn``'s option (``N``, ``words``/``numbers``, ``N-words``/``N-numbers``, or None) as
    ``(questions per context, fixed kind of value or None)``."""
    if option is None:
        return TURNS, None
    count, _, kind = option.partition("-")
    if count in KINDS and not kind:
        return TURNS, count
    if count.isdigit() and 1 <= int(count) <= MAX_TURNS and (not kind or kind in KINDS):
        return int(count), kind or None
    raise KVSqueezeError(
        f"unknown multiturn option {option!r}; use multiturn:N (N = 1..{MAX_TURNS} questions per context), "
        "multiturn:words|numbers or multiturn:N-words|N-numbers"
    )


def generate(tokenizer, *, samples: int, length: int, seed: int, option: str | None = None) -> list[Sample]:
    turns, fixed_kind = parse_option(option)
    budget = length - 60 * turns - 80
    if budget < 64:
        raise KVSqueezeError(f"context length {length} is too short for multiturn with {turns} questions; use at "
                             f"least {60 * turns + 80 + 64} or fewer questions")  # fmt: skip
    words = vocabulary()
    out = []
    for i in range(samples):
        rng = rng_for("multiturn", length, seed, i)
        kind = fixed_kind or ("numbers" if i % 2 == 0 else "words")
        hay = essay_haystack(tokenizer, budget, rng.randrange(1000))
        keys, values = [], []
        while len(keys) < turns:
            key = f"{rng.choice(words)}-{rng.choice(words)}"
            value = str(rng.randrange(1_000_000, 10_000_000)) if kind == "numbers" else rng.choice(words)
            if key not in keys and value not in values and value not in hay.lower():
                keys.append(key)
                values.append(value)
        depths = [round(rng.uniform(0.05, 0.95), 3) for _ in range(turns)]
        context, offsets = insert_sentences(
            hay, [(d, needle_sentence(kind, k, v)) for d, k, v in zip(depths, keys, values, strict=True)]
        )
        order = list(range(turns))
        rng.shuffle(order)
        questions = tuple(
            Question(
                f"What is the special magic {kind[:-1]} for {keys[j]} mentioned in the provided text?",
                (values[j],),
                f"The special magic {kind[:-1]} for {keys[j]} mentioned in the provided text is",
                max_new_tokens=12,
            )
            for j in order
        )
        meta = {"length": length, "depth": None, "values": kind, "needle_depths": depths, "needle_offsets": offsets}
        out.append(Sample("multiturn", f"{length}/{i:04d}", "multiturn", context, questions, meta=meta))
    return out
