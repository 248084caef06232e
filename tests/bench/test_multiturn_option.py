"""``multiturn:N`` (questions per context) and ``multiturn:N-words``: more turns, default samples unchanged."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from kvsqueeze.bench.tasks import TaskSpec, generate, generated_tokens, parse_tasks
from kvsqueeze.errors import KVSqueezeError

# sha256 of the default samples (3 turns, numbers and words alternating) as the generator made them before the
# option existed (seed 0, 1024 characters, the character tokenizer): old results stay comparable
DEFAULT_SHA = "8c3faca1fcd07965e488cce6d5d15dd98b8fe37bb6c7dade2c0c97ed34a369a0"


def digest(samples) -> str:
    dicts = [s.as_dict() for s in samples]
    for d in dicts:  # a field added later, at its default ("model": the conversation holds the model's answers)
        assert d.pop("history") == "model"
    return hashlib.sha256(json.dumps(dicts, sort_keys=True).encode()).hexdigest()


def test_default_samples_are_unchanged(chars):
    samples = generate(TaskSpec("multiturn"), chars, samples=2, length=1024, seed=0)
    assert [len(s.questions) for s in samples] == [3, 3]
    assert digest(samples) == DEFAULT_SHA


@pytest.mark.parametrize(("option", "turns", "kinds"), [("5", 5, {"numbers", "words"}), ("4-words", 4, {"words"}),
                                                         ("numbers", 3, {"numbers"})])  # fmt: skip
def test_option_sets_questions_and_kind(chars, option, turns, kinds):
    (task,) = parse_tasks(f"multiturn:{option}")
    samples = generate(task, chars, samples=2, length=1024, seed=0)
    assert {s.meta["values"] for s in samples} == kinds
    for s in samples:
        assert len(chars.encode(s.context)) <= 1024
        assert len(s.questions) == turns == len(s.meta["needle_depths"])
        keys = {re.search(r"for (\S+) mentioned", q.text).group(1) for q in s.questions}
        assert len(keys) == turns  # every turn asks for another needle
        for q in s.questions:  # each answer is in the context once, in its key's needle
            assert s.context.count(f"is: {q.answers[0]}.") == 1
            assert re.search(rf"for {re.escape(q.text.split(' for ')[1].split()[0])} is: {q.answers[0]}\.", s.context)
    assert generated_tokens(task) == 64 * turns


@pytest.mark.parametrize("option", ["0", "17", "x", "4-letters", "words-4", "-words"])
def test_bad_option_is_one_line(option):
    with pytest.raises(KVSqueezeError, match="multiturn:N") as err:
        parse_tasks(f"multiturn:{option}")
    assert "\n" not in str(err.value)


def test_too_short_context_for_the_questions(chars):
    with pytest.raises(KVSqueezeError, match="too short for multiturn with 16 questions"):
        generate(TaskSpec("multiturn", "16"), chars, samples=1, length=1024, seed=0)
