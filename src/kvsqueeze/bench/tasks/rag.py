"""``rag``: questions over prompts assembled from documents of a pool that is reused across questions — the setting
of the reuse methods (KVLink, APE, Cache-Craft, KVShare), where each document's cache can be computed once.

The pool: ``POOL_FACTOR × k`` documents per (context length, seed), each about ``length / k`` tokens from the
start of a different Paul Graham essay, and each with one fact of its own (keys are two essay words joined by a
hyphen, values 7-digit numbers absent from every document, all distinct) that a copy of the document carries,
planted on a sentence boundary at a seeded depth (``niah``'s needle): ``One of the special magic numbers for {key}
is: {value}.`` Sample ``i`` draws ``k`` documents of the pool in a seeded order and asks for the fact of one of them
(the target's place cycles through the prompt), whose fact-bearing copy it holds; the others are the plain
documents. So every document — plain or with its fact — recurs across samples, rarely in the same order, and a
prompt holds one fact (on SmolLM2 several similar facts in one prompt leave even the full recompute near chance;
numbers rather than words for the same reason: the full recompute finds 8 of 8 numbers at 2,048 tokens, 0 of 8
words). ``rag:K`` sets ``k`` (4 … 8, default 6). Score: the value found in the answer (RULER's
``string_match_all``) plus the gold answer's log-likelihood; the evaluator adds KL to the full recompute, the time
to first token and the fraction of context tokens recomputed.
"""

from __future__ import annotations

from kvsqueeze.bench.tasks.base import Question, Sample, rng_for
from kvsqueeze.bench.tasks.niah import needle_sentence
from kvsqueeze.bench.text import essay_haystack, vocabulary
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.prompts import encode

DOCUMENTS = (4, 5, 6, 7, 8)
OPTIONS = tuple(str(k) for k in DOCUMENTS)
DEFAULT_DOCUMENTS = 6
POOL_FACTOR = 2
TEMPLATE_TOKENS = 80  # the chat template, the question and the answer prefix
ANSWER_SLACK = 4


def plant(text: str, sentence: str, depth: float) -> str:
    """``sentence`` inserted at the sentence boundary at or before the fraction ``depth`` of ``text``."""
    cut = int(len(text) * depth)
    boundary = text.rfind(". ", 0, cut)
    cut = 0 if boundary < 0 else boundary + 2
    return f"{text[:cut]}{sentence} {text[cut:]}"


def pool(tokenizer, *, k: int, length: int, seed: int) -> list[tuple[str, str, str, str]]:
    """``(document, document with its fact, key, value)`` of the pool at this length and seed."""
    per_doc = (length - TEMPLATE_TOKENS) // k
    if per_doc < 64:
        raise KVSqueezeError(f"context length {length} is too short for rag with {k} documents; use at least 1024")
    rng = rng_for("rag-pool", k, length, seed)
    words = vocabulary()
    size = POOL_FACTOR * k
    first = rng.randrange(1000)
    room = len(encode(tokenizer, needle_sentence("numbers", "xxxx-xxxx", "1234567"))) + 4
    texts = [essay_haystack(tokenizer, per_doc - room, first + j).strip() for j in range(size)]
    keys: list[str] = []
    values: list[str] = []
    while len(values) < size:
        value = str(rng.randrange(1_000_000, 10_000_000))
        if value not in values and not any(value in t for t in texts):
            values.append(value)
    while len(keys) < size:
        key = f"{rng.choice(words)}-{rng.choice(words)}"
        if key not in keys:
            keys.append(key)
    out = []
    for text, key, value in zip(texts, keys, values, strict=True):
        depth = round(rng.uniform(0.1, 0.9), 3)
        out.append((text, plant(text, needle_sentence("numbers", key, value), depth), key, value))
    return out


def generate(tokenizer, *, samples: int, length: int, seed: int, option: str | None = None) -> list[Sample]:
    if option is not None and option not in OPTIONS:
        raise KVSqueezeError(f"unknown rag option {option!r}; give the documents per prompt: {', '.join(OPTIONS)}")
    k = int(option) if option else DEFAULT_DOCUMENTS
    documents = pool(tokenizer, k=k, length=length, seed=seed)
    out = []
    for i in range(samples):
        rng = rng_for("rag", k, length, seed, i)
        chosen = rng.sample(range(len(documents)), k)
        place = i % k
        target = chosen[place]
        _, _, key, value = documents[target]
        texts = tuple(documents[j][1] if j == target else documents[j][0] for j in chosen)
        question = f"What is the special magic number for {key} mentioned in the provided text?"
        prefix = f"The special magic number for {key} mentioned in the provided text is"
        budget = len(encode(tokenizer, " " + value)) + ANSWER_SLACK
        out.append(
            Sample(
                task="rag",
                id=f"{length}/{k}/{i:04d}",
                kind="rag",
                context="".join(t + "\n\n" for t in texts),
                documents=texts,
                questions=(Question(question, (value,), prefix, max_new_tokens=budget),),
                meta={"length": length, "documents": k, "pool": chosen, "target_place": place, "key": key},
            )
        )
    return out
