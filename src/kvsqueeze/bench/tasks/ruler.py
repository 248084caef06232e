"""RULER's synthetic aggregation and tracing tasks (Hsieh et al., "RULER: What's the Real Context Size of Your
Long-Context Language Models?", arXiv:2404.06654), generated offline from a seed. Wording is ours; the task
definitions follow the paper:

- ``vt`` (variable tracking, multi-hop tracing): one chain of 4 hops, ``VAR A = 12345`` then
  ``VAR B = VAR A`` … ``VAR E = VAR D``, the 5 statements spread evenly (in order) through repeated filler
  sentences. Asked for every variable that holds the value; expected = the 5 names.
- ``cwe`` (common words extraction): a numbered list of words in which 10 *common* words appear ``freq_cw``
  times each and *uncommon* words 3 times each, shuffled. ``freq_cw`` is RULER's 30, lowered for short contexts
  so that common words fill at most half the list. Expected = the 10 common words.
- ``fwe`` (frequent words extraction): a text of random "coded" words whose counts follow a Zipf law
  (alpha = 2, count of rank ``k`` = ``floor(N k^-2 / Z)``: exact counts rather than RULER's sampled ones, so the
  top 3 are strictly the most frequent; ranks whose count is 0 are absent). Expected = the 3 most frequent coded words.

Words come from the essays' vocabulary (cwe) or random letters (vt names, fwe coded words). Score: RULER's
``string_match_all`` (fraction of expected strings found in the output), plus the gold log-likelihood.
"""

from __future__ import annotations

import string

from kvsqueeze.bench.tasks.base import Question, Sample, rng_for
from kvsqueeze.bench.text import vocabulary
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.prompts import encode

FILLER = "The river runs to the sea. The hills are quiet today. The bread is warm. Here we go again. "
HOPS = 4
NUM_CW, FREQ_CW, FREQ_UCW = 10, 30, 3
ZIPF_ALPHA = 2.0
_OVERHEAD = 120  # tokens left for the question and the chat template


def _budget(length: int) -> int:
    budget = length - _OVERHEAD
    if budget < 128:
        raise KVSqueezeError(f"context length {length} is too short for RULER tasks; use at least 512")
    return budget


def _name(rng) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def generate_vt(tokenizer, *, samples: int, length: int, seed: int, option: str | None = None) -> list[Sample]:
    budget = _budget(length)
    filler_tokens = len(encode(tokenizer, FILLER))
    out = []
    for i in range(samples):
        rng = rng_for("vt", length, seed, i)
        value = str(rng.randrange(10_000, 100_000))
        names: list[str] = []
        while len(names) < HOPS + 1:
            name = _name(rng)
            if name not in names:
                names.append(name)
        statements = [f"VAR {names[0]} = {value}."] + [f"VAR {names[j]} = VAR {names[j - 1]}." for j in range(1, 5)]
        stmt_tokens = sum(len(encode(tokenizer, s)) + 1 for s in statements)
        n_filler = max((budget - stmt_tokens) // filler_tokens, len(statements))
        parts, every = [], n_filler / len(statements)
        positions = [int(every * (j + 0.5)) for j in range(len(statements))]
        for k in range(n_filler):
            for j, pos in enumerate(positions):
                if pos == k:
                    parts.append(statements[j] + " ")
            parts.append(FILLER)
        context = "".join(parts)
        question = f"Find all variables that are assigned the value {value} in the text above."
        prefix = f"Following the chain of assignments in the text above, the variables that hold the value {value} are:"
        out.append(
            Sample(
                task="vt",
                id=f"{length}/{i:04d}",
                kind="qa",
                context=context,
                questions=(Question(question, tuple(names), prefix, max_new_tokens=30),),
                meta={"length": length, "depth": None, "value": value},
            )
        )
    return out


def generate_cwe(tokenizer, *, samples: int, length: int, seed: int, option: str | None = None) -> list[Sample]:
    budget = _budget(length)
    words = [w for w in vocabulary() if 4 <= len(w) <= 8]
    out = []
    for i in range(samples):
        rng = rng_for("cwe", length, seed, i)
        pool = rng.sample(words, 2000)
        common, uncommon_pool = pool[:NUM_CW], pool[NUM_CW:]
        per_entry = sum(len(encode(tokenizer, f"{k + 100}. {w}\n")) for k, w in enumerate(pool[:50])) / 50
        entries = int(budget / per_entry)
        freq = max(2 * FREQ_UCW, min(FREQ_CW, entries // (2 * NUM_CW)))
        n_uncommon = max((entries - freq * NUM_CW) // FREQ_UCW, 1)
        while True:
            items = [w for w in common for _ in range(freq)]
            items += [w for w in uncommon_pool[:n_uncommon] for _ in range(FREQ_UCW)]
            rng.shuffle(items)
            context = "".join(f"{k + 1}. {w}\n" for k, w in enumerate(items))
            if len(encode(tokenizer, context)) <= budget or n_uncommon <= 1:
                break
            n_uncommon = max(1, int(n_uncommon * 0.9))
        question = f"What are the {NUM_CW} most common words in the list above?"
        prefix = f"The {NUM_CW} words that appear most often in the list are:"
        out.append(
            Sample(
                task="cwe",
                id=f"{length}/{i:04d}",
                kind="qa",
                context=context,
                questions=(Question(question, tuple(common), prefix, max_new_tokens=40),),
                meta={"length": length, "depth": None, "freq_cw": freq, "uncommon": n_uncommon},
            )
        )
    return out


def _coded_word(rng) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def generate_fwe(tokenizer, *, samples: int, length: int, seed: int, option: str | None = None) -> list[Sample]:
    budget = _budget(length)
    out = []
    for i in range(samples):
        rng = rng_for("fwe", length, seed, i)
        vocab: list[str] = []
        while len(vocab) < 300:
            w = _coded_word(rng)
            if w not in vocab:
                vocab.append(w)
        weights = [(k + 1) ** -ZIPF_ALPHA for k in range(len(vocab))]
        total = sum(weights)
        n_words = budget
        while True:  # ranks whose exact count rounds to 0 drop out: the vocabulary shrinks with the text
            counts = [int(n_words * w / total) for w in weights]
            items = [w for w, c in zip(vocab, counts, strict=True) for _ in range(c)]
            rng.shuffle(items)
            context = " ".join(items)
            if len(encode(tokenizer, context)) <= budget or n_words < 50:
                break
            n_words = int(n_words * 0.9)
        if not counts[0] > counts[1] > counts[2] > counts[3]:
            raise KVSqueezeError(f"context length {length} is too short for fwe; use at least 512")
        question = "What are the three most frequent coded words in the coded text above?"
        prefix = "The three most frequent coded words in the text above are:"
        out.append(
            Sample(
                task="fwe",
                id=f"{length}/{i:04d}",
                kind="qa",
                context=context,
                questions=(Question(question, tuple(vocab[:3]), prefix, max_new_tokens=20),),
                meta={"length": length, "depth": None, "counts_top4": counts[:4]},
            )
        )
    return out
