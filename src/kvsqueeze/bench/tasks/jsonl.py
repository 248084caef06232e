"""``file:PATH.jsonl``: a user dataset in kvpress' schema, one JSON object per line with ``context``,
``question``, ``answer`` (a string, or a list of strings that must all appear) and optional ``answer_prefix``,
``max_new_tokens`` (default 32) and ``task`` (kvpress' dataset columns). Score: fraction of the expected strings
found in the output (case-insensitive), plus the gold log-likelihood; rows with a ``task`` are reported per task
(as ``file:PATH#TASK``). ``--samples`` takes the first N lines.

The file must be UTF-8; every problem (encoding, JSON, a missing or mistyped field) is reported as one line naming
the line number and the fix. Rows are named ``file:NAME`` after the file's name; the runner keys each sample on
its content, so a moved or renamed file is the same dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvsqueeze.bench.tasks.base import Question, Sample
from kvsqueeze.errors import KVSqueezeError


def load(path: str | Path) -> list[dict]:
    """Read and validate every line (errors name the line and the fix)."""
    path = Path(path)
    if path.is_dir():
        raise KVSqueezeError(f"{path} is a directory; give --task file:PATH.jsonl with a JSONL file")
    if not path.is_file():
        raise KVSqueezeError(f"dataset file not found: {path}; give --task file:PATH.jsonl with an existing file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KVSqueezeError(f"cannot read {path}: {exc.strerror or exc}") from None
    rows = []
    for n, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise KVSqueezeError(
                f"{path}:{n}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); save the file as "
                "UTF-8, e.g. `iconv -f latin1 -t utf-8 IN > OUT`"
            ) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KVSqueezeError(f"{path}:{n}: not valid JSON ({exc.msg}); write one JSON object per line") from None
        except RecursionError:
            raise KVSqueezeError(f"{path}:{n}: JSON nested too deeply; write one flat JSON object per line") from None
        if not isinstance(row, dict):
            raise KVSqueezeError(f"{path}:{n}: expected a JSON object with context, question, answer")
        for key in ("context", "question"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise KVSqueezeError(f"{path}:{n}: field {key!r} must be a non-empty string")
        answer = row.get("answer")
        if isinstance(answer, str):
            answer = [answer]
        if not isinstance(answer, list) or not answer or not all(isinstance(a, str) and a for a in answer):
            raise KVSqueezeError(f"{path}:{n}: field 'answer' must be a non-empty string or list of strings")
        if not isinstance(row.get("task", ""), str):
            raise KVSqueezeError(f"{path}:{n}: field 'task' must be a string")
        if not isinstance(row.get("answer_prefix", ""), str):
            raise KVSqueezeError(f"{path}:{n}: field 'answer_prefix' must be a string")
        mnt = row.get("max_new_tokens", 32)
        if not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 1:
            raise KVSqueezeError(f"{path}:{n}: field 'max_new_tokens' must be a positive integer")
        rows.append({**row, "answer": answer, "max_new_tokens": mnt, "line": n})
    if not rows:
        raise KVSqueezeError(f"{path} holds no samples; write one JSON object per line")
    return rows


def generate(path: str, *, samples: int) -> list[Sample]:
    out = []
    for row in load(path)[:samples]:
        q = Question(row["question"], tuple(row["answer"]), row.get("answer_prefix", ""), row["max_new_tokens"])
        label = f"file:{Path(path).name}" + (f"#{row['task']}" if row.get("task") else "")
        out.append(Sample(label, f"line{row['line']:05d}", "qa", row["context"], (q,),
                          meta={"length": None, "depth": None, "line": row["line"]}))  # fmt: skip
    return out
