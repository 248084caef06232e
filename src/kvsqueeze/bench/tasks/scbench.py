"""``scbench``: shared-context sessions in the manner of SCBench (Li et al., "SCBench: A KV Cache-Centric Analysis
of Long-Context Methods", arXiv:2412.10319), generated offline and deterministically from the essays.

One context, ``TURNS`` questions about it, in one of SCBench's two shared-context modes:

- ``multiturn``: one conversation; the questions come in sequence with the earlier turns' gold answers in the
  history, as SCBench does by default (its ``disable_golden_context`` off: one wrong answer does not derail the
  later turns, and every method's conversation is the same text, so a sample's cells decode batched), the
  ``multiturn`` evaluator;
- ``multirequest``: independent requests over the one context, each answered from the context alone (the
  ``multirequest`` evaluator: a fork of the compressed context per request).

and one of its four capability categories (SCBench's task in parentheses; contexts and questions are templates
over seeded words and numbers, no dataset):

- ``string`` — string retrieval: a list of records ``The value of the record {key} is {value}.`` (Retr.KV), asked
  for a key's value, and for the value that starts and ends with given digits (Retr.Prefix-Suffix);
- ``semantic`` — semantic retrieval: facts about invented people planted in essay text, asked in other words
  than they are stated (``… keeps 7 goats …`` → "How many goats does …?"; En.QA in spirit);
- ``global`` — global information: a list of numbered readings (``Reading 12 is 4605.``), asked for the largest,
  the smallest, the most frequent reading and how many readings a given value has (Math.Find and counting: no
  answer sits in one place), and one reading by its number;
- ``multitask`` — one context holding records, facts and readings, the session mixing the three kinds of question
  (Mix.*).

Option: ``scbench:CATEGORY``, ``scbench:MODE`` or ``scbench:CATEGORY-MODE``; without it sample ``i`` takes category
``CATEGORIES[i % 4]`` and mode ``MODES[(i // 4) % 2]`` (with a category alone: ``MODES[i % 2]``). Every turn is
scored with ``string_match_all`` (rows carry ``turn1 … turnN``, so decay over turns shows). Deviations from SCBench:
synthetic contexts of the requested length (SCBench's are 100k+ tokens of real documents), answers are short
strings a 135M model can produce (numbers), and generation is capped at the answer's tokens plus a few.
"""

from __future__ import annotations

import random

from kvsqueeze.bench.tasks.base import Question, Sample, rng_for
from kvsqueeze.bench.text import essay_haystack, vocabulary
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.prompts import encode

CATEGORIES = ("string", "semantic", "global", "multitask")
MODES = ("multiturn", "multirequest")
OPTIONS = (*CATEGORIES, *MODES, *(f"{c}-{m}" for c in CATEGORIES for m in MODES))
TURNS = 5
TEMPLATE_TOKENS = 60 * TURNS + 80  # the chat template, the questions and the answers held in the conversation
ANSWER_SLACK = 4
ANIMALS = ("goats", "cats", "horses", "sheep", "dogs", "geese", "rabbits", "pigs")
# (how a fact is stated, how it is asked, what the answer continues)
FACTS = (
    ("{name} keeps exactly {n} {animal} on a farm outside town.", "How many {animal} does {name} have?",
     "{name} has"),
    ("Everyone knows that {name} was born in the year {n}.", "In which year did {name} come into the world?",
     "{name} came into the world in"),
    ("The locker assigned to {name} carries the number {n}.", "What is the number on the locker of {name}?",
     "The number on the locker of {name} is"),
)  # fmt: skip


def parse_option(option: str | None) -> tuple[str | None, str | None]:
    """``(category, mode)`` of an option (None where it leaves the choice to the sample index)."""
    if option is None:
        return None, None
    if option not in OPTIONS:
        raise KVSqueezeError(f"unknown scbench option {option!r}; valid: {', '.join(OPTIONS)}")
    if option in MODES:
        return None, option
    category, _, mode = option.partition("-")
    return category, mode or None


def _fill(tokenizer, items: list[str], budget: int, make) -> list[str]:
    """Append ``make()`` to ``items`` while the joined text stays within ``budget`` tokens (counted in steps)."""
    while True:
        extra = [make() for _ in range(16)]
        if len(encode(tokenizer, "\n".join(items + extra))) > budget:
            for item in extra:
                if len(encode(tokenizer, "\n".join([*items, item]))) > budget:
                    return items
                items.append(item)
            return items
        items.extend(extra)


def _number(rng: random.Random, taken: set[str], digits: int = 7) -> str:
    while True:
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if value not in taken:
            taken.add(value)
            return value


def _question(text: str, answer: str, prefix: str, tokenizer) -> Question:
    budget = len(encode(tokenizer, " " + answer)) + ANSWER_SLACK
    return Question(text, (answer,), prefix, max_new_tokens=budget)


def string_part(tokenizer, rng: random.Random, budget: int, turns: int) -> tuple[str, list[Question]]:
    words, taken = vocabulary(), set()
    records: list[tuple[str, str]] = []

    def record() -> str:
        key = f"{rng.choice(words)}-{rng.choice(words)}"
        records.append((key, _number(rng, taken)))
        return f"The value of the record {key} is {records[-1][1]}."

    lines = _fill(tokenizer, [], budget, record)
    records = records[: len(lines)]
    if len(records) < turns:
        raise KVSqueezeError(
            f"{len(records)} records fit this scbench context, {turns} are asked; use a longer context"
        )
    text = "Records:\n" + "\n".join(lines)
    questions = []
    for t, (key, value) in enumerate(rng.sample(records, turns)):
        if t % 2 == 0:
            questions.append(_question(f"What is the value of the record {key}?", value,
                                       f"The value of the record {key} is", tokenizer))  # fmt: skip
        else:
            ends = [(v[:2], v[-2:]) for _, v in records]
            if ends.count((value[:2], value[-2:])) == 1:  # the prefix and suffix pick one value
                questions.append(_question(f"Which value starts with {value[:2]} and ends with {value[-2:]}?", value,
                                           f"The value that starts with {value[:2]} and ends with {value[-2:]} is",
                                           tokenizer))  # fmt: skip
            else:
                questions.append(_question(f"What is the value of the record {key}?", value,
                                           f"The value of the record {key} is", tokenizer))  # fmt: skip
    return text, questions


def semantic_part(tokenizer, rng: random.Random, budget: int, turns: int) -> tuple[str, list[Question]]:
    words, taken = vocabulary(), set()
    facts = []
    for _ in range(turns):
        name = f"{rng.choice(words).capitalize()} {rng.choice(words).capitalize()}"
        state, ask, prefix = rng.choice(FACTS)
        n = _number(rng, taken, digits=4)
        animal = rng.choice(ANIMALS)
        facts.append((state.format(name=name, n=n, animal=animal), ask.format(name=name, animal=animal),
                      prefix.format(name=name), n))  # fmt: skip
    room = budget - sum(len(encode(tokenizer, f[0])) + 2 for f in facts)
    hay = essay_haystack(tokenizer, max(room, 16), rng.randrange(1000))
    sentences = hay.split(". ")
    for fact in facts:
        sentences.insert(rng.randrange(len(sentences) + 1), fact[0].rstrip("."))
    text = ". ".join(sentences)
    order = list(range(turns))
    rng.shuffle(order)
    return text, [_question(facts[j][1], facts[j][3], facts[j][2], tokenizer) for j in order]


def global_part(tokenizer, rng: random.Random, budget: int, turns: int) -> tuple[str, list[Question]]:
    readings: list[int] = []

    def reading() -> str:
        readings.append(rng.randrange(1000, 9000))
        return f"Reading {len(readings)} is {readings[-1]}."

    lines = _fill(tokenizer, [], budget - 24, reading)
    readings = readings[: len(lines)]
    frequent = readings[rng.randrange(len(readings))]
    for _ in range(3):  # one value recurs: the most frequent reading
        spot = rng.randrange(len(readings))
        readings[spot] = frequent
        lines[spot] = f"Reading {spot + 1} is {frequent}."
    top = 9000 + rng.randrange(999)  # the extremes are unique
    low = 100 + rng.randrange(899)
    spots = rng.sample(range(len(readings)), 2)
    for spot, value in zip(spots, (top, low), strict=True):
        readings[spot] = value
        lines[spot] = f"Reading {spot + 1} is {value}."
    text = "Sensor readings:\n" + "\n".join(lines)
    count = str(readings.count(frequent))
    k = rng.randrange(len(readings))
    pool = [
        _question("What is the largest reading?", str(top), "The largest reading is", tokenizer),
        _question("What is the smallest reading?", str(low), "The smallest reading is", tokenizer),
        _question(
            "Which reading value occurs most often?",
            str(frequent),
            "The reading value that occurs most often is",
            tokenizer,
        ),
        _question(
            f"How many readings have the value {frequent}?",
            count,
            f"The number of readings of {frequent} is",
            tokenizer,
        ),
        _question(f"What is reading {k + 1}?", str(readings[k]), f"Reading {k + 1} is", tokenizer),
    ]
    return text, [pool[t % len(pool)] for t in range(turns)]


PARTS = {"string": string_part, "semantic": semantic_part, "global": global_part}


def generate(tokenizer, *, samples: int, length: int, seed: int, option: str | None = None) -> list[Sample]:
    fixed_category, fixed_mode = parse_option(option)
    budget = length - TEMPLATE_TOKENS
    if budget < 200:
        raise KVSqueezeError(f"context length {length} is too short for scbench; use at least 1024")
    out = []
    for i in range(samples):
        rng = rng_for("scbench", option, length, seed, i)
        category = fixed_category or CATEGORIES[i % len(CATEGORIES)]
        mode = fixed_mode or MODES[(i if fixed_category else i // len(CATEGORIES)) % len(MODES)]
        if category == "multitask":
            kinds = ("string", "semantic", "global")
            parts = [PARTS[name](tokenizer, rng, budget // 3, len(range(j, TURNS, 3))) for j, name in enumerate(kinds)]
            context = "\n\n".join(text for text, _ in parts)
            mixed = [parts[t % 3][1][t // 3] for t in range(TURNS)]  # the session alternates the three kinds
            questions = tuple(mixed)
        else:
            context, qs = PARTS[category](tokenizer, rng, budget, TURNS)
            questions = tuple(qs)
        out.append(
            Sample(
                task=f"scbench:{category}-{mode}",  # the report's tables and per-turn plots are per category × mode
                id=f"{length}/{category}/{mode}/{i:04d}",
                kind=mode,
                context=context,
                questions=questions,
                meta={"length": length, "category": category, "mode": mode, "turns": TURNS},
                history="gold",  # multi-turn: the earlier turns' gold answers in the conversation, as in SCBench
            )
        )
    return out
