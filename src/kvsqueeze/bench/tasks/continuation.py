"""Continuation tasks: teacher-force a known continuation after a (compressed) context.

- ``ppl`` — Jane Austen's prose (shipped in the package): the context is consecutive paragraphs of one
  novel starting at a seeded paragraph, ``length`` tokens long; the continuation is the next
  ``CONTINUATION_TOKENS`` tokens of the same text. Primary score: perplexity of the continuation
  (``exp`` of the mean negative log-likelihood per token; lower is better).
- ``fidelity`` — essays: context ``length`` tokens of essay text from a seeded essay, continuation the next
  ``CONTINUATION_TOKENS`` tokens. At every continuation position the compressed cache's next-token distribution
  is compared with the full cache's: mean ``KL(full ‖ compressed)`` in nats (lower is better) and top-1
  agreement (fraction of positions whose argmax agree). Continuous and sensitive where exact match is coarse.

Both tasks report all four numbers (``nll``, ``ppl``, ``kl``, ``top1``); they differ in text and primary score.
No chat template: the model reads raw prose. The compressed part is always the context alone.
"""

from __future__ import annotations

from functools import lru_cache

from kvsqueeze.bench.tasks.base import Sample, rng_for
from kvsqueeze.bench.text import austen_paragraphs, essay_stream
from kvsqueeze.prompts import encode

CONTINUATION_TOKENS = 64


@lru_cache(maxsize=4)
def _austen_stream(tokenizer) -> tuple[list[int], list[int], list[str]]:
    ids: list[int] = []
    starts: list[int] = []
    novels: list[str] = []
    for novel, para in austen_paragraphs():
        starts.append(len(ids))
        novels.append(novel)
        ids.extend(encode(tokenizer, para + "\n\n"))
    return ids, starts, novels


def _window(tokenizer, ids: list[int], start: int, length: int) -> tuple[str, str]:
    ids = ids + ids  # wrap around
    context = ids[start : start + length]
    cont = ids[start + length : start + length + CONTINUATION_TOKENS]
    return tokenizer.decode(context, skip_special_tokens=True), tokenizer.decode(cont, skip_special_tokens=True)


def generate_ppl(tokenizer, *, samples: int, length: int, seed: int, option: str | None = None) -> list[Sample]:
    ids, starts, novels = _austen_stream(tokenizer)
    out = []
    for i in range(samples):
        rng = rng_for("ppl", length, seed, i)
        p = rng.randrange(len(starts))
        context, cont = _window(tokenizer, ids, starts[p], length)
        meta = {"length": length, "depth": None, "novel": novels[p], "paragraph": p}
        out.append(Sample("ppl", f"{length}/{i:04d}", "continuation", context, continuation=cont, meta=meta))
    return out


def generate_fidelity(tokenizer, *, samples: int, length: int, seed: int, option: str | None = None) -> list[Sample]:
    ids, starts = essay_stream(tokenizer)
    out = []
    for i in range(samples):
        rng = rng_for("fidelity", length, seed, i)
        e = rng.randrange(len(starts))
        context, cont = _window(tokenizer, ids, starts[e], length)
        meta = {"length": length, "depth": None, "essay": e}
        out.append(Sample("fidelity", f"{length}/{i:04d}", "continuation", context, continuation=cont, meta=meta))
    return out
