"""``multiturn``: one compressed context, several questions answered in sequence (the shared-context, multi-turn
mode of SCBench: Li et al., "SCBench: A KV Cache-Centric Analysis of Long-Context Methods", arXiv:2412.10319).

The context is an essay haystack with ``TURNS`` needles (distinct keys, numbers or words as in ``niah``) at
seeded depths. The context is prefilled and compressed once (always query-agnostic: no question is known yet);
turn ``t`` appends question ``t`` (asking for one key's value) to the conversation, which already holds the
earlier questions and the model's own answers, and generates. Each turn is scored with ``string_match_all`` and
the gold log-likelihood (on a fork of the conversation cache, so scoring never alters the conversation);
the row reports the mean over turns and every turn's score.
"""

from __future__ import annotations

from kvsqueeze.bench.tasks.base import Question, Sample, rng_for
from kvsqueeze.bench.tasks.niah import insert_sentences, needle_sentence
from kvsqueeze.bench.text import essay_haystack, vocabulary

TURNS = 3


def generate(tokenizer, *, samples: int, length: int, seed: int, option: str | None = None) -> list[Sample]:
    words = vocabulary()
    out = []
    for i in range(samples):
        rng = rng_for("multiturn", length, seed, i)
        kind = "numbers" if i % 2 == 0 else "words"
        hay = essay_haystack(tokenizer, length - 60 * TURNS - 80, rng.randrange(1000))
        keys, values = [], []
        while len(keys) < TURNS:
            key = f"{rng.choice(words)}-{rng.choice(words)}"
            value = str(rng.randrange(1_000_000, 10_000_000)) if kind == "numbers" else rng.choice(words)
            if key not in keys and value not in values and value not in hay.lower():
                keys.append(key)
                values.append(value)
        depths = [round(rng.uniform(0.05, 0.95), 3) for _ in range(TURNS)]
        context, offsets = insert_sentences(
            hay, [(d, needle_sentence(kind, k, v)) for d, k, v in zip(depths, keys, values, strict=True)]
        )
        order = list(range(TURNS))
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
