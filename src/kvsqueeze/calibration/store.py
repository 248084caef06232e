"""Calibration data and per-model caching of calibration results (shared by codecs that fit offline).

Calibration text is the offline essay collection (:mod:`kvsqueeze.data`), taken from the *end* of the sorted
list so that it does not overlap the first essays the benchmarks read. Results are JSON files under
``kvsqueeze.models.cache_dir() / "calibration" / <model key>``, keyed by the calibration parameters.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from kvsqueeze.data import essays
from kvsqueeze.errors import KVSqueezeError, os_reason
from kvsqueeze.models import cache_dir


def model_key(model) -> str:
    """A file-name-safe key for a model: its name or path plus a hash of its configuration."""
    name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name.rstrip("/").split("/")[-1])[:60] or "model"
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest()[:12]
    return f"{stem}-{digest}"


def calibration_ids(model, tokenizer=None, n_tokens: int = 512, seed: int = 0) -> torch.Tensor:
    """``[1, n_tokens]`` calibration token ids: essay text, or random ids when there is no tokenizer."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(1, model.config.vocab_size, (1, n_tokens), generator=gen)
    text = "\n\n".join(reversed(essays()[-8:]))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    return ids.to(model.device)


def cache_path(model, kind: str, params: dict) -> Path:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "calibration" / model_key(model) / f"{kind}-{digest}.json"


def cached(model, kind: str, params: dict, compute: Callable[[], dict]) -> dict:
    """The calibration result for ``(model, kind, params)``: read from the cache, or computed once and stored."""
    path = cache_path(model, kind, params)
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


def calibration_dir(model) -> Path:
    """The folder where a model's calibration files are written by default."""
    return cache_dir() / "calibration" / model_key(model)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically; an unwritable place is a one-line error naming the fix."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError as exc:
        raise KVSqueezeError(f"cannot write {path} ({os_reason(exc, path)}); give --out a writable path") from None


def read_file(path: str | Path, parse: Callable[[Path], object]):
    """``parse(path)``, parsed once per version of the file (keyed on its modification time and size, so an edited
    calibration is read again). ``parse`` raises :class:`KVSqueezeError` for a file that is not what it expects."""
    file = Path(path).expanduser()
    try:
        stat = file.stat()
    except OSError:
        raise KVSqueezeError(f"calibration file {str(path)!r} not found") from None
    return _parsed(str(file.resolve()), stat.st_mtime_ns, stat.st_size, parse)


@lru_cache(maxsize=32)
def _parsed(path: str, mtime_ns: int, size: int, parse: Callable[[Path], object]):
    return parse(Path(path))
