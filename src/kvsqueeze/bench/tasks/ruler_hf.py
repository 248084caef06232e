"""``ruler:OWNER/NAME`` / ``ruler:PATH``: RULER as kvpress publishes it (Hsieh et al., "RULER: What's the Real
Context Size of Your Long-Context Language Models?", arXiv 2404.06654; Hub ``simonjegou/ruler``, one config per
context length, split ``test``).

Row fields: ``context``, ``question``, ``answer_prefix``, ``answer`` (list), ``task`` (``niah_single_1`` …,
``vt``, ``cwe``, ``fwe``, ``qa_1``, ``qa_2``), ``max_new_tokens``. Scores are RULER's string matches as kvpress
computes them: ``string_match_part`` for the qa tasks, ``string_match_all`` for the others; each task is reported
as ``ruler:TASK``. For a Hub id ``--context-length`` picks the config (default 4096); a local file is read whole
(``--context-length`` must be left out). ``--samples`` takes the first N rows. The generated ``vt``, ``cwe``,
``fwe`` and ``niah`` tasks remain available offline under their own names.
"""

from __future__ import annotations

from kvsqueeze.bench.tasks import hf
from kvsqueeze.bench.tasks.base import Question, Sample
from kvsqueeze.errors import KVSqueezeError

DEFAULT_LENGTH = 4096


def parse_option(option: str | None) -> tuple[str, bool]:
    """``(source, is_local)``."""
    if not option:
        raise KVSqueezeError("give the dataset: --task ruler:OWNER/NAME (e.g. simonjegou/ruler) or ruler:PATH.jsonl")
    return option, hf.is_local(option)


def default_lengths(option: str | None) -> tuple[int, ...]:
    return (0,) if parse_option(option)[1] else (DEFAULT_LENGTH,)


def validate(option: str | None) -> None:
    source, local = parse_option(option)
    if local:
        rows(source, None)
    else:
        hf.check_hub_source(source)


def rows(source: str, config: str | None) -> list[dict]:
    data = hf.read_local(source) if config is None else hf.read_hub(source, config, "test")
    where = source if config is None else f"{source} ({config})"
    for n, row in enumerate(data, start=1):
        at = f"{where}: row {n}"
        hf.field(row, "context", str, at)
        hf.field(row, "question", str, at)
        hf.field(row, "task", str, at)
        hf.string_list(row, "answer", at)
        if not isinstance(row.get("answer_prefix", ""), str):
            raise KVSqueezeError(f"{at}: field 'answer_prefix' must be a string")
        mnt = row.get("max_new_tokens", 32)
        if not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 1:
            raise KVSqueezeError(f"{at}: field 'max_new_tokens' must be a positive integer")
    return data


def generate(tokenizer, *, samples: int, length: int, seed: int, option: str | None = None) -> list[Sample]:
    source, local = parse_option(option)
    if local and length:
        raise KVSqueezeError("a local RULER file is read whole; leave out --context-length")
    out = []
    for n, row in enumerate(rows(source, None if local else str(length))[:samples], start=1):
        question = Question(
            text=row["question"],
            answers=hf.string_list(row, "answer", ""),
            answer_prefix=row.get("answer_prefix", ""),
            max_new_tokens=row.get("max_new_tokens", 32),
            metric="part" if "qa" in row["task"] else "all",
        )
        meta = {"length": length or None, "depth": None, "source": source}
        out.append(Sample(f"ruler:{row['task']}", f"{length}/row{n:05d}", "qa", row["context"], (question,), meta=meta))
    return out
