"""``convqa``: a deterministic synthetic dialogue whose facts are stated in the history and asked after it; one
sweep with ``epicache`` next to ``snapkv`` on the tiny model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvsqueeze import KVSqueezeError
from kvsqueeze.bench import scoring
from kvsqueeze.bench.runner import SweepConfig, parse_methods, read_rows, run_sweep
from kvsqueeze.bench.tasks import TaskSpec, generate, parse_tasks
from kvsqueeze.bench.tasks.convqa import QUESTIONS, SESSIONS, messages_of
from kvsqueeze.conversation import render
from tests.bench.conftest import TinyProvider
from tests.conftest import TINY

LENGTH = 2500  # characters (one token each): a dialogue of ~20 passage turns


class LongTinyProvider(TinyProvider):
    """The tiny random Llama with room for a long character-level dialogue."""

    @property
    def config(self):
        return LlamaConfig(**{**TINY, "max_position_embeddings": 4096})

    @property
    def model(self):
        if self._model is None:
            torch.manual_seed(0)
            self._model = LlamaForCausalLM(self.config).eval()
        return self._model


def test_generator_is_deterministic_and_states_every_fact_in_the_history(chars):
    task = TaskSpec("convqa")
    a = generate(task, chars, samples=3, length=LENGTH, seed=0)
    assert a == generate(task, chars, samples=3, length=LENGTH, seed=0)
    assert a != generate(task, chars, samples=3, length=LENGTH, seed=1)
    for sample in a:
        assert len(sample.questions) == QUESTIONS and sample.kind == "convqa"
        messages = messages_of(sample)
        assert [m["role"] for m in messages[:2]] == ["user", "assistant"] and len(messages) % 2 == 0
        assert sum(len(m) for m in render(chars, messages)) <= LENGTH
        for q in sample.questions:
            (answer,) = q.answers
            name = q.answer_prefix.split(" is ")[0].split(" moved ")[0].split(" of ")[-1].split(" where ")[-1]
            stated = [m["content"] for m in messages if answer in m["content"] and m["role"] == "user"]
            assert len(stated) == 1 and name in stated[0], (q, name)  # the fact is in one user turn, with its name
            assert answer not in q.text and answer not in q.answer_prefix  # the question does not give it away
            assert scoring.match(f" {answer}.", q.answers) == 1.0
            assert scoring.match(" Something else.", q.answers) == 0.0


def test_topical_sessions_are_about_one_person_whose_facts_they_state(chars):
    for sample in generate(TaskSpec("convqa", "topical"), chars, samples=2, length=2 * LENGTH, seed=0):
        messages = messages_of(sample)
        opens = [i for i, m in enumerate(messages) if m["content"].startswith("Let us talk about my friend ")]
        assert len(opens) == SESSIONS and opens[0] == 0
        sessions = [messages[a:b] for a, b in zip(opens, [*opens[1:], len(messages)], strict=True)]
        people = [s[0]["content"].removeprefix("Let us talk about my friend ").split(",")[0] for s in sessions]
        assert len(set(people)) == SESSIONS
        for person, session in zip(people, sessions, strict=True):
            for m in session[2::2]:  # every passage turn names the session's person
                assert m["role"] == "user" and m["content"].startswith(f"{person} read this to me: ")
        asked = [next(p for p in people if p in q.text) for q in sample.questions]
        assert sorted(asked.count(p) for p in people) == [1, 1, 2, 2]  # six facts over four people
        for q, person in zip(sample.questions, asked, strict=True):
            (answer,) = q.answers
            holder = [k for k, session in enumerate(sessions) if any(answer in m["content"] for m in session)]
            assert holder == [people.index(person)]  # stated in its person's session only
    plain = generate(TaskSpec("convqa"), chars, samples=1, length=LENGTH, seed=0)[0]
    assert "read this to me" not in plain.context


def test_persona_sessions_state_their_person_s_facts_one_per_turn(chars):
    task = TaskSpec("convqa", "persona")
    samples = generate(task, chars, samples=2, length=2 * LENGTH, seed=0)
    assert samples == generate(task, chars, samples=2, length=2 * LENGTH, seed=0)
    for sample in samples:
        messages = messages_of(sample)
        assert sum(len(m) for m in render(chars, messages)) <= 2 * LENGTH and sample.id.split("/")[1] == "persona"
        opens = [i for i, m in enumerate(messages) if m["content"].startswith("Let us talk about my friend ")]
        assert len(opens) == SESSIONS and opens[0] == 0
        sessions = [messages[a:b] for a, b in zip(opens, [*opens[1:], len(messages)], strict=True)]
        people = [s[0]["content"].removeprefix("Let us talk about my friend ").rstrip(".") for s in sessions]
        assert len(set(people)) == SESSIONS
        for person, session in zip(people, sessions, strict=True):
            turns = [m["content"] for m in session[2::2]]
            assert len(turns) >= 2 and all(person in t for t in turns)  # every user turn is about the person
        asked = [next(p for p in people if p in q.text) for q in sample.questions]
        assert [asked.count(p) for p in people] == [2, 2, 1, 1]  # six facts: two each about the first two people
        for q, person in zip(sample.questions, asked, strict=True):
            (answer,) = q.answers
            stated = [(k, m["content"]) for k, s in enumerate(sessions) for m in s if answer in m["content"]]
            assert len(stated) == 1 and stated[0][0] == people.index(person)  # one turn, in its person's session
            assert stated[0][1].endswith(f" {answer}.") and answer not in q.text + q.answer_prefix


def test_too_short_or_an_option_is_refused(chars):
    with pytest.raises(KVSqueezeError, match="too short"):
        generate(TaskSpec("convqa"), chars, samples=1, length=400, seed=0)
    with pytest.raises(KVSqueezeError, match="option"):
        parse_tasks("convqa:x")


def test_a_convqa_sweep_runs_epicache_next_to_snapkv(tmp_path):
    config = SweepConfig(tasks=parse_tasks("convqa"), methods=parse_methods("snapkv,epicache"), ratios=[0.5],
                         samples=1, lengths=[LENGTH], out=tmp_path)  # fmt: skip
    run_sweep(config, LongTinyProvider(), progress=False)
    rows = {r["method"]: r for r in read_rows(tmp_path / "results.jsonl")}
    assert set(rows) == {"full", "snapkv", "epicache"}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("error") for r in rows.values()]
    for r in rows.values():
        assert {f"turn{i}" for i in range(1, QUESTIONS + 1)} <= set(r["scores"]) and len(r["output"]) == QUESTIONS
    epi = rows["epicache"]
    assert len(epi["routed"]) == QUESTIONS and epi["episodes"] >= 1
    assert epi["cache_bytes"] < 0.6 * rows["full"]["cache_bytes"]
    assert epi["peak_cache_bytes"] < rows["full"]["cache_bytes"]  # the block-wise prefill never held it all
    assert "| epicache@0.5 | episodic |" in (tmp_path / "summary.md").read_text()
