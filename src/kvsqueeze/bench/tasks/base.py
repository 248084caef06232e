"""What a task generator produces: samples of questions about a context, with their expected answers."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Literal

Kind = Literal["qa", "continuation", "multiturn", "speed", "longgen", "rag", "multirequest", "convqa"]
OPENERS = "\"'“‘«([{<`"  # an answer right after one of these starts without a space


@dataclass(frozen=True)
class Question:
    """One question; ``answers`` are the strings a correct output contains (scored by ``metric``)."""

    text: str
    answers: tuple[str, ...]
    answer_prefix: str = ""
    max_new_tokens: int = 16
    metric: str = "all"  # all: fraction of answers found; part: 1 if any is found; or a benchmark's own metric
    choices: tuple[str, ...] = ()  # what a benchmark metric needs beside the answers (classes, options)

    @property
    def gold(self) -> str:
        """The reference continuation whose log-likelihood is reported, as it follows ``answer_prefix``: after
        "… is" it is " oyster", after '… is "' or "… is " (or no prefix at all) it is "oyster" — the text a correct
        answer would be, so the full cache's log-likelihood scores what the model writes."""
        joined = ", ".join(self.answers)
        last = self.answer_prefix[-1:]
        if not last or last.isspace() or last in OPENERS:
            return joined
        return " " + joined


@dataclass(frozen=True)
class Sample:
    """One benchmark sample. ``kind`` decides how the runner evaluates it."""

    task: str
    id: str
    kind: Kind
    context: str
    questions: tuple[Question, ...] = ()
    continuation: str = ""  # continuation tasks: the text teacher-forced after the context
    documents: tuple[str, ...] = ()  # rag: the context's documents, each a reusable piece (``context`` joins them)
    meta: dict = field(default_factory=dict)  # depth, length, variant … (plots and tables group by these)
    history: Literal["model", "gold"] = "model"  # multiturn: earlier answers in the conversation are the model's own
    # or the gold ones (SCBench's multi-turn default)

    def as_dict(self) -> dict:
        return asdict(self)


def rng_for(*parts: object) -> random.Random:
    """A generator seeded from a string: deterministic across processes (independent of PYTHONHASHSEED)."""
    return random.Random(":".join(str(p) for p in parts))
