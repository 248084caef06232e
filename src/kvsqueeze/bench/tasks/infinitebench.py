"""``infinitebench:TASK`` / ``infinitebench:OWNER/NAME:TASK`` / ``infinitebench:PATH/TASK.jsonl``: InfiniteBench in
its published Hugging Face schema (Zhang et al., "∞Bench: Extending Long Context Evaluation Beyond 100K Tokens",
arXiv 2402.13718; Hub ``xinrongzhang2022/InfiniteBench``, one split per task).

Row fields: ``id``, ``context``, ``input`` (the question), ``answer`` (list), ``options`` (list; the four choices of
``longbook_choice_eng`` and ``code_debug``). A local file is named after its task (``passkey.jsonl``, as the
benchmark ships them). Each task is scored by its own metric with its own generation length
(``kvsqueeze.bench.metrics``); ``--context-length N`` cuts contexts to N tokens by removing the middle (the
benchmark's truncation); the default 0 keeps them whole. ``--samples`` takes the first N rows.

Deviations: instructions are our own wording (the benchmark's templates are per model); the context is the
compressed part, the instruction, question and options follow it.
"""

from __future__ import annotations

from pathlib import Path

from kvsqueeze.bench.metrics import INFINITEBENCH_METRICS
from kvsqueeze.bench.tasks import hf
from kvsqueeze.bench.tasks.base import Question, Sample
from kvsqueeze.errors import KVSqueezeError

HUB_ID = "xinrongzhang2022/InfiniteBench"

# task -> (max new tokens (the benchmark's), instruction after the context)
TASKS: dict[str, tuple[int, str]] = {
    "passkey": (6, "{input}\nReply with the pass key only."),
    "number_string": (12, "{input}\nReply with the sequence of digits only."),
    "kv_retrieval": (50, "{input}\nReply with the value only."),
    "longbook_sum_eng": (1200, "Summarize the book above."),
    "longbook_choice_eng": (40, "{input}\n\n{options}\nReply with the letter of the right option."),
    "longbook_qa_eng": (40, "Answer briefly, using the book above.\n\nQuestion: {input}\nAnswer:"),
    "longbook_qa_chn": (40, "请根据上面的书简要回答。\n\n问题：{input}\n回答："),
    "longdialogue_qa_eng": (40, "{input}\nReply with the character's name only."),
    "math_find": (3, "{input}\nReply with the number only."),
    "math_calc": (30000, "Compute the expression above and list every intermediate result.\n{input}"),
    "code_run": (5, "{input}\nReply with the return value only."),
    "code_debug": (5, "{input}\n\n{options}\nWhich function has the deliberate error? Reply with its letter."),
}
assert set(TASKS) == set(INFINITEBENCH_METRICS)


def parse_option(option: str | None) -> tuple[str, str | None, str]:
    """``(source, split or None for a local file, task)``."""
    if not option:
        raise KVSqueezeError(f"give a task: --task infinitebench:TASK (one of {', '.join(TASKS)}) or :PATH/TASK.jsonl")
    if hf.is_local(option):
        task = Path(option).stem
        if task not in TASKS:
            raise KVSqueezeError(f"name the file after its task ({', '.join(TASKS)}); got {Path(option).name!r}")
        return option, None, task
    repo, _, task = option.rpartition(":") if option.count("/") == 1 and ":" in option else ("", "", option)
    if task not in TASKS:
        raise KVSqueezeError(f"unknown InfiniteBench task {task!r}; valid: {', '.join(TASKS)} (or a .jsonl path)")
    return repo or HUB_ID, task, task


def validate(option: str | None) -> None:
    source, split, task = parse_option(option)
    if split is None:
        rows(source, None, task)
    else:
        hf.check_hub_source(source)


def rows(source: str, split: str | None, task: str) -> list[dict]:
    data = hf.read_local(source) if split is None else hf.read_hub(source, None, split)
    where = source if split is None else f"{source} ({split})"
    for n, row in enumerate(data, start=1):
        at = f"{where}: row {n}"
        hf.field(row, "context", str, at)
        hf.field(row, "input", str, at)
        answers = hf.string_list(row, "answer", at)
        options = hf.string_list(row, "options", at, allow_empty=True)
        if task in ("longbook_choice_eng", "code_debug") and answers[0] not in options[:4]:
            raise KVSqueezeError(f"{at}: the answer of a {task} row must be one of its first four options")
    return data


def generate(tokenizer, *, samples: int, length: int, seed: int, option: str | None = None) -> list[Sample]:
    source, split, task = parse_option(option)
    max_new, instruction = TASKS[task]
    out = []
    for n, row in enumerate(rows(source, split, task)[:samples], start=1):
        options = hf.string_list(row, "options", "", allow_empty=True)
        listed = "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", options, strict=False))
        question = Question(
            text=instruction.format(input=row["input"], options=listed),
            answers=hf.string_list(row, "answer", ""),
            max_new_tokens=max_new,
            metric=f"infinitebench:{task}",
            choices=options,
        )
        context, tokens = hf.middle_truncate(tokenizer, row["context"], length)
        meta = {"length": length or None, "depth": None, "context_tokens": tokens, "source": source}
        sample_id = f"{length}/{row.get('id', n)}"
        out.append(Sample(f"infinitebench:{task}", sample_id, "qa", context, (question,), meta=meta))
    return out
