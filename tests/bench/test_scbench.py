"""``scbench``: every category's answers follow from its context (the value of the asked record, the extremes and
the mode of the readings, the planted facts), the sample grid covers category × mode, and multi-request sessions
answer each request from the shared context alone."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from kvsqueeze import KVSqueezeError
from kvsqueeze.bench.capture import build_cache
from kvsqueeze.bench.evaluators import evaluator_for
from kvsqueeze.bench.runner import SweepConfig, parse_methods, read_rows, run_sweep
from kvsqueeze.bench.tasks import TaskSpec, generate, parse_tasks
from kvsqueeze.bench.tasks.scbench import CATEGORIES, MODES, TURNS
from tests.bench.conftest import TinyProvider
from tests.conftest import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _records(context: str) -> dict[str, str]:
    return dict(re.findall(r"^The value of the record ([a-z]+-[a-z]+) is (\d+)\.$", context, flags=re.M))


def _readings(context: str) -> list[int]:
    return [int(v) for v in re.findall(r"^Reading \d+ is (\d+)\.$", context, flags=re.M)]


def test_grid_and_answers_follow_from_the_context(chars):
    samples = generate(TaskSpec("scbench"), chars, samples=8, length=3000, seed=1)
    assert {(s.meta["category"], s.kind) for s in samples} == {(c, m) for c in CATEGORIES for m in MODES}
    for s in samples:
        assert len(s.questions) == TURNS and len(chars.encode(s.context)) <= 3000
        records, readings = _records(s.context), _readings(s.context)
        for q in s.questions:
            (answer,) = q.answers
            if q.text.startswith("What is the value of the record"):
                key = q.text.split()[-1].rstrip("?")
                assert records[key] == answer
            elif q.text.startswith("Which value starts with"):
                head, tail = re.findall(r"\d+", q.text)
                assert [v for v in records.values() if v.startswith(head) and v.endswith(tail)] == [answer]
            elif q.text == "What is the largest reading?":
                assert int(answer) == max(readings) and readings.count(max(readings)) == 1
            elif q.text == "What is the smallest reading?":
                assert int(answer) == min(readings) and readings.count(min(readings)) == 1
            elif q.text == "Which reading value occurs most often?":
                (top, n), (_, runner_up) = Counter(readings).most_common(2)
                assert int(answer) == top and n > runner_up
            elif q.text.startswith("How many readings have the value"):
                assert int(answer) == readings.count(int(re.findall(r"\d+", q.text)[0]))
            elif q.text.startswith("What is reading"):
                assert readings[int(re.findall(r"\d+", q.text)[0]) - 1] == int(answer)
            else:  # a fact about an invented person, asked in other words than stated
                name = re.search(r"(?:does|did|of) ([A-Z][a-z]+ [A-Z][a-z]+)", q.text).group(1)
                stated = [sentence for sentence in s.context.split(". ") if name in sentence]
                assert len(stated) == 1 and answer in stated[0] and q.text not in s.context
    with pytest.raises(KVSqueezeError, match="unknown option"):
        parse_tasks("scbench:everything")
    assert {s.kind for s in generate(TaskSpec("scbench", "global-multirequest"), chars, samples=3, length=2000,
                                     seed=0)} == {"multirequest"}  # fmt: skip


def test_multirequest_answers_each_request_from_the_context_alone(chars):
    model = tiny_model("llama")
    sample = generate(TaskSpec("scbench", "string-multirequest"), chars, samples=1, length=900, seed=0)[0]
    evaluator = evaluator_for(model, chars, sample, False)
    cache = build_cache(model, evaluator.prefill, "none", None)
    held = cache.get_seq_length()
    together = evaluator.decode(cache)
    assert cache.get_seq_length() == held  # every request ran on a fork
    alone = evaluator_for(model, chars, sample.__class__(**{**sample.__dict__, "questions": sample.questions[-1:]}),
                          False)  # fmt: skip
    last = alone.decode(build_cache(model, alone.prefill, "none", None))
    assert last["output"] == together["output"][-1:]  # the earlier requests changed nothing for the last
    assert last["scores"]["turn1"] == together["scores"][f"turn{TURNS}"]
    assert {f"turn{i}" for i in range(1, TURNS + 1)} <= set(together["scores"])


def test_a_scbench_sweep_scores_every_turn(tmp_path):
    config = SweepConfig(tasks=parse_tasks("scbench:multitask"), methods=parse_methods("snapkv"), ratios=[0.5],
                         samples=2, lengths=[900], out=tmp_path)  # fmt: skip
    run_sweep(config, TinyProvider(), progress=False)
    rows = read_rows(tmp_path / "results.jsonl")
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    assert {r["meta"]["mode"] for r in rows} == set(MODES)
    for r in rows:
        assert len(r["output"]) == TURNS and {f"turn{i}" for i in range(1, TURNS + 1)} <= set(r["scores"])
    assert {r["task"] for r in rows} == {"scbench:multitask-multiturn", "scbench:multitask-multirequest"}
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("Score per turn") == 2 and "| snapkv@0.5 | eviction |" in summary
    assert (tmp_path / "turns_scbench_multitask-multirequest.png").stat().st_size > 0


def test_multiturn_conversation_holds_the_gold_answers(chars):
    """SCBench's multi-turn default: the earlier turns' gold answers are in the conversation, whatever the model
    answered, so the cache ends holding the same text for every method."""
    model = tiny_model("llama")
    sample = generate(TaskSpec("scbench", "global-multiturn"), chars, samples=1, length=900, seed=0)[0]
    assert sample.history == "gold"
    evaluator = evaluator_for(model, chars, sample, False)
    final = evaluator.prompt([q.gold for q in sample.questions[:-1]]) + sample.questions[-1].gold
    assert all(f"Answer: {q.answer_prefix}{q.gold}" in final for q in sample.questions[:-1])
    outputs = set()
    for method, ratio in (("none", None), ("snapkv", 0.5)):
        cache = build_cache(model, evaluator.prefill, method, ratio)
        row = evaluator.decode(cache)
        assert cache.get_seq_length() == len(chars.encode(final))  # the gold conversation, not the model's answers
        assert len(row["output"]) == TURNS
        outputs.add(tuple(row["output"]))
    assert all(q.gold.strip() not in out for q in sample.questions for out in outputs)  # the random model's answers
