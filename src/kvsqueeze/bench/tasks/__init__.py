"""Task registry: ``--task`` names → deterministic sample generators (see each module's docstring).

A task spec is ``NAME`` or ``NAME:OPTION`` (``niah:multikey``, ``longgen:1000``) or ``file:PATH.jsonl``; several
are joined by commas. Standard benchmarks take a Hub dataset id or a local file in the published schema:
``longbench:DATASET|OWNER/NAME:DATASET|PATH``, ``infinitebench:TASK|OWNER/NAME:TASK|PATH``, ``ruler:OWNER/NAME|PATH``.
Every generator takes ``(tokenizer, samples=, length=, seed=, option=)`` and returns the same
samples, byte for byte, for the same arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvsqueeze.bench.tasks import (
    continuation,
    convqa,
    infinitebench,
    jsonl,
    longbench,
    longgen,
    multiturn,
    niah,
    rag,
    ruler,
    ruler_hf,
    scbench,
    speed,
)
from kvsqueeze.bench.tasks.base import Question, Sample
from kvsqueeze.errors import KVSqueezeError

GENERATORS: dict[str, Callable[..., list[Sample]]] = {
    "niah": niah.generate,
    "vt": ruler.generate_vt,
    "cwe": ruler.generate_cwe,
    "fwe": ruler.generate_fwe,
    "ppl": continuation.generate_ppl,
    "fidelity": continuation.generate_fidelity,
    "multiturn": multiturn.generate,
    "speed": speed.generate,
    "longgen": longgen.generate,
    "rag": rag.generate,
    "scbench": scbench.generate,
    "convqa": convqa.generate,
}
# standard benchmarks read from a dataset (Hub id or local file): name -> (generator, validator)
DATASETS: dict[str, tuple[Callable[..., list[Sample]], Callable[[str | None], None]]] = {
    "longbench": (longbench.generate, longbench.validate),
    "infinitebench": (infinitebench.generate, infinitebench.validate),
    "ruler": (ruler_hf.generate, ruler_hf.validate),
}
OPTIONS = {"niah": niah.OPTIONS, "rag": rag.OPTIONS, "scbench": scbench.OPTIONS, "convqa": convqa.OPTIONS}
# what may follow ``NAME:`` (optional for a generated task, required for a dataset); a task absent here takes none
OPTION_HINTS = {"niah": "variant", "multiturn": "questions", "longgen": "tokens", "rag": "documents",
                "scbench": "variant", "convqa": "variant", "longbench": "DATASET", "infinitebench": "TASK",
                "ruler": "DATASET_ID"}  # fmt: skip
TASK_NAMES = (*GENERATORS, "file:PATH.jsonl", *(f"{name}:{OPTION_HINTS[name]}" for name in DATASETS))
# Part of every cell key: bump a task's version when its generator changes what a sample means (the sample's
# content hash, also in the key, catches changed text; this catches e.g. a changed scoring rule for the task).
TASK_VERSIONS: dict[str, int] = {**dict.fromkeys(GENERATORS, 1), "file": 1}


def task_help() -> str:
    """``--task``'s help: every registered task, with the option it takes."""
    generated = [f"{name}[:{OPTION_HINTS[name]}]" if name in OPTION_HINTS else name for name in GENERATORS]
    return ", ".join([*generated, *TASK_NAMES[len(GENERATORS) :]]) + "; comma-separated for several"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    option: str | None = None

    @property
    def label(self) -> str:
        return self.name if self.option is None else f"{self.name}:{self.option}"


def parse_tasks(text: str) -> list[TaskSpec]:
    """Validate ``--task`` (before any model work); file datasets are read and checked here."""
    specs = []
    parts = [text] if text.strip().startswith("file:") else text.split(",")
    parts = [p for p in parts if p.strip()]
    for part in parts:
        part = part.strip()
        if not part:
            continue
        name, _, option = part.partition(":")
        option = option or None
        if name == "file":
            if not option:
                raise KVSqueezeError("give the dataset as --task file:PATH.jsonl")
            jsonl.load(option)
        elif name in DATASETS:
            DATASETS[name][1](option)
        elif name == "longgen":
            longgen.parse_tokens(option)
        elif name == "multiturn":
            multiturn.parse_option(option)
        elif name not in GENERATORS:
            raise KVSqueezeError(f"unknown task {name!r}; valid: {', '.join(TASK_NAMES)}")
        elif option is not None and option not in OPTIONS.get(name, ()):
            valid = ", ".join(OPTIONS.get(name, ())) or "none"
            raise KVSqueezeError(f"unknown option {option!r} for task {name!r}; valid options: {valid}")
        specs.append(TaskSpec(name, option))
    if not specs:
        raise KVSqueezeError(f"no task given; valid: {', '.join(TASK_NAMES)}")
    return specs


def default_lengths(task: TaskSpec) -> tuple[int, ...]:
    if task.name == "ruler":
        return ruler_hf.default_lengths(task.option)
    if task.name in DATASETS:
        return (0,)  # whole samples (``--context-length`` truncates them)
    if task.name == "speed":
        return speed.DEFAULT_LENGTHS
    return longgen.DEFAULT_LENGTHS if task.name == "longgen" else (2048,)


def task_version(name: str) -> int:
    """The generator version of task ``name`` (``file`` for user datasets)."""
    return TASK_VERSIONS.get(name, 1)


def generated_tokens(task: TaskSpec) -> int:
    """An upper bound of the tokens a sample adds beyond its context length (template, question, answer or
    continuation): what the model must hold on top of ``--context-length``."""
    if task.name == "longgen":
        return longgen.parse_tokens(task.option) + 64
    if task.name == "multiturn":
        return multiturn.parse_option(task.option)[0] * 64
    if task.name in ("scbench", "convqa"):
        return 0  # its generator keeps the questions and answers of a session inside the context length
    return 128


def generate(task: TaskSpec, tokenizer, *, samples: int, length: int, seed: int) -> list[Sample]:
    """The samples of one task at one context length."""
    if task.name == "file":
        return jsonl.generate(task.option, samples=samples)
    if task.name in DATASETS:
        return DATASETS[task.name][0](tokenizer, samples=samples, length=length, seed=seed, option=task.option)
    return GENERATORS[task.name](tokenizer, samples=samples, length=length, seed=seed, option=task.option)


__all__ = [
    "GENERATORS",
    "TASK_NAMES",
    "Question",
    "Sample",
    "TaskSpec",
    "default_lengths",
    "generate",
    "generated_tokens",
    "parse_tasks",
    "task_help",
    "task_version",
]
