"""Rows of a standard benchmark: a local file in the published Hugging Face schema, or a Hub dataset id.

A source that names an existing path, or ends in ``.jsonl`` / ``.json`` / ``.parquet``, is read locally (JSON lines
or a JSON list with the standard library; Parquet through ``datasets``). Anything else is a Hub dataset id, loaded
with ``datasets.load_dataset`` (the ``bench`` extra); every failure is a one-line error naming the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.extras import missing

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_local(source: str) -> bool:
    path = Path(source).expanduser()
    return path.exists() or path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/", "~"))


def read_local(source: str) -> list[dict]:
    path = Path(source).expanduser()
    if not path.is_file():
        raise KVSqueezeError(f"dataset file not found: {path}; give an existing .jsonl/.json/.parquet file")
    if path.suffix == ".parquet":
        return [dict(r) for r in _load_dataset("parquet", None, "train", data_files=str(path))]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KVSqueezeError(f"{path}: not valid JSON ({exc.msg}); write a list of objects or JSON lines") from None
        data = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise KVSqueezeError(f"{path}: expected a JSON list of objects")
        rows = data
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise KVSqueezeError(
                    f"{path}:{n}: not valid JSON ({exc.msg}); write one JSON object per line"
                ) from None
    if not rows:
        raise KVSqueezeError(f"{path} holds no samples")
    if not all(isinstance(r, dict) for r in rows):
        raise KVSqueezeError(f"{path}: every sample must be a JSON object")
    return rows


def check_hub_source(dataset_id: str) -> None:
    """Before any model work: a Hub id needs ``datasets`` and has the ``owner/name`` form."""
    if dataset_id.count("/") != 1 or not all(dataset_id.split("/")):
        raise KVSqueezeError(f"{dataset_id!r} is neither a local file nor a Hub dataset id (owner/name)")
    if missing("datasets"):
        raise KVSqueezeError(
            f"loading {dataset_id} from the Hugging Face Hub needs `datasets` (the 'bench' extra): "
            "pip install 'kvsqueeze[bench]', or pass a local .jsonl file in the same schema"
        )


def _load_dataset(path: str, config: str | None, split: str, **kwargs) -> list[dict]:
    if missing("datasets"):
        raise KVSqueezeError(
            "reading this dataset needs `datasets` (the 'bench' extra): pip install 'kvsqueeze[bench]'"
        )
    import datasets

    try:
        return [dict(r) for r in datasets.load_dataset(path, config, split=split, **kwargs)]
    except Exception as exc:  # network, unknown config/split, corrupt file: one line, not a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"{path}" + (f" ({config})" if config else "") + f", split {split!r}"
        raise KVSqueezeError(f"cannot load {where}: {first[:300]}") from None


def read_hub(dataset_id: str, config: str | None, split: str) -> list[dict]:
    check_hub_source(dataset_id)
    return _load_dataset(dataset_id, config, split)


def middle_truncate(tokenizer, text: str, max_tokens: int) -> tuple[str, int]:
    """``text`` cut to ``max_tokens`` tokens by removing its middle (LongBench's and InfiniteBench's rule); also the
    token count before the cut. ``max_tokens`` 0 keeps everything."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not max_tokens or len(ids) <= max_tokens:
        return text, len(ids)
    half = max_tokens // 2
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[len(ids) - (max_tokens - half) :], skip_special_tokens=True)
    return head + tail, len(ids)


def field(row: dict, key: str, kind, where: str):
    value = row.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise KVSqueezeError(f"{where}: field {key!r} must be a {names} (the published schema)")
    return value


def string_list(row: dict, key: str, where: str, allow_empty: bool = False) -> tuple[str, ...]:
    value = row.get(key)
    if isinstance(value, str):
        value = [value]
    if value is None and allow_empty:
        return ()
    if not isinstance(value, list) or (not value and not allow_empty):
        raise KVSqueezeError(f"{where}: field {key!r} must be a list of strings (the published schema)")
    return tuple(str(v) for v in value)
