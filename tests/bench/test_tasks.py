"""Task generators: deterministic bytes for a seed, and the answers really are in the context where stated."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from kvsqueeze.bench.tasks import Question, Sample, TaskSpec, generate, parse_tasks
from kvsqueeze.bench.tasks.niah import DEPTHS, VARIANTS
from kvsqueeze.errors import KVSqueezeError
from tests.conftest import tiny_model

TASKS = ["niah", "vt", "cwe", "fwe", "fidelity", "multiturn", "speed", "longgen", "rag", "scbench"]


@pytest.mark.parametrize("name", TASKS)
def test_same_seed_same_bytes_other_seed_other_bytes(chars, name):
    a = generate(TaskSpec(name), chars, samples=3, length=1024, seed=7)
    b = generate(TaskSpec(name), chars, samples=3, length=1024, seed=7)
    c = generate(TaskSpec(name), chars, samples=3, length=1024, seed=8)
    assert [s.as_dict() for s in a] == [s.as_dict() for s in b]
    assert [s.context for s in a] != [s.context for s in c]
    assert len({s.id for s in a}) == 3


@pytest.mark.parametrize("name", TASKS)
def test_contexts_fit_the_requested_length(chars, name):
    for s in generate(TaskSpec(name), chars, samples=2, length=1024, seed=0):
        assert 600 < len(chars.encode(s.context)) <= 1024


def test_niah_grid_and_needles_at_stated_depth(chars):
    samples = generate(TaskSpec("niah"), chars, samples=20, length=8000, seed=3)
    assert {(s.meta["variant"], s.meta["depth"]) for s in samples} == {(v, d) for v in VARIANTS for d in DEPTHS}
    for s in samples:
        q = s.questions[0]
        kind = s.meta["values"]
        needles = re.findall(rf"One of the special magic {kind} for ([a-z]+-[a-z]+) is: (\w+)\.", s.context)
        assert len(needles) == (1 if s.meta["variant"] == "single" else 4)
        for value in q.answers:  # each expected value occurs exactly once, inside a needle
            assert len(re.findall(rf"\b{value}\b", s.context)) == 1
            assert value in dict((v, k) for k, v in needles)
        # the scored needle (first expected value) sits at the stated depth of the haystack
        needle = re.compile(rf" ?One of the special magic {kind} for [a-z]+-[a-z]+ is: \w+\. ")
        pos = s.context.index(f"is: {q.answers[0]}.")
        before, hay = needle.sub("", s.context[:pos].rsplit("One of", 1)[0]), needle.sub("", s.context)
        assert -0.005 <= s.meta["depth"] - len(before) / len(hay) <= 300 / len(hay), s.id
        for key in s.meta["keys"]:
            assert key in q.text
        if s.meta["variant"] == "multikey":  # distractors: other keys, other values
            assert len({k for k, _ in needles}) == 4 and len(q.answers) == 1
        # the generation budget is the gold answer's length plus a few tokens of glue
        assert q.max_new_tokens == len(chars.encode(" " + ", ".join(q.answers))) + 4


def test_niah_variant_option_and_errors(chars):
    assert {s.meta["variant"] for s in generate(TaskSpec("niah", "multiquery"), chars, samples=4, length=1024,
                                                seed=0)} == {"multiquery"}  # fmt: skip
    words = generate(TaskSpec("niah", "words"), chars, samples=6, length=1024, seed=0)
    assert {s.meta["values"] for s in words} == {"words"} and len({s.meta["depth"] for s in words}) == 5
    assert all(not any(ch.isdigit() for ch in s.questions[0].answers[0]) for s in words)
    pinned = generate(TaskSpec("niah", "multikey-numbers"), chars, samples=3, length=1024, seed=0)
    assert {(s.meta["variant"], s.meta["values"]) for s in pinned} == {("multikey", "numbers")}
    assert parse_tasks("niah:single-words")[0].option == "single-words"
    with pytest.raises(KVSqueezeError, match="valid options"):
        parse_tasks("niah:nope")
    with pytest.raises(KVSqueezeError, match="unknown task"):
        parse_tasks("needle")


def test_vt_chain_resolves_to_the_expected_names(chars):
    for s in generate(TaskSpec("vt"), chars, samples=3, length=1024, seed=1):
        assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", s.context))
        value = s.meta["value"]

        def resolve(name: str, assigned: dict = assigned) -> str:
            v = assigned[name]
            return resolve(v[4:]) if v.startswith("VAR ") else v

        holders = {n for n in assigned if resolve(n) == value}
        assert holders == set(s.questions[0].answers)
        offsets = [s.context.index(f"VAR {n} =") for n in s.questions[0].answers]
        assert offsets == sorted(offsets)  # hops appear in order


def test_cwe_common_words_are_the_most_common(chars):
    for s in generate(TaskSpec("cwe"), chars, samples=2, length=2048, seed=2):
        counts = Counter(re.findall(r"^\d+\. (\w+)$", s.context, flags=re.M))
        top = {w for w, _ in counts.most_common(10)}
        assert top == set(s.questions[0].answers)
        assert min(counts[w] for w in top) == s.meta["freq_cw"] > max(c for w, c in counts.items() if w not in top)


def test_fwe_top3_are_strictly_most_frequent(chars):
    for s in generate(TaskSpec("fwe"), chars, samples=2, length=2048, seed=2):
        counts = Counter(s.context.split()).most_common()
        assert tuple(w for w, _ in counts[:3]) == s.questions[0].answers
        assert counts[0][1] > counts[1][1] > counts[2][1] > counts[3][1]


def test_multiturn_every_answer_is_in_the_context(chars):
    for s in generate(TaskSpec("multiturn"), chars, samples=2, length=1024, seed=0):
        assert len(s.questions) == 3
        for q in s.questions:
            assert s.context.count(f"is: {q.answers[0]}.") == 1


def test_fidelity_continuation_follows_the_context_in_the_essays(chars):
    from kvsqueeze.data import essays

    corpus = "".join(t.strip() + "\n\n" for t in essays())
    corpus = "".join(c if 3 <= ord(c) < 128 else "?" for c in corpus)
    for s in generate(TaskSpec("fidelity"), chars, samples=2, length=512, seed=0):
        assert (s.context + s.continuation) in corpus + corpus
        assert len(s.continuation) == 64


def test_ppl_uses_austen_prose_shipped_in_the_package(chars, monkeypatch):
    import subprocess

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"ppl ran a subprocess at run time: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)  # no apt-get / dpkg-deb at run time
    samples = generate(TaskSpec("ppl"), chars, samples=2, length=512, seed=0)
    from kvsqueeze.bench.text import austen_paragraphs

    text = " ".join(p for _, p in austen_paragraphs())
    for s in samples:
        assert s.meta["novel"] in {"emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                                   "sensesensibility"}  # fmt: skip
        assert s.context[:200].replace("\n\n", " ") in text.replace("\n\n", " ")
        assert s.continuation


def test_jsonl_schema_and_errors(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text('{"context": "c1", "question": "q1", "answer": "a1"}\n'
                    '{"context": "c2", "question": "q2", "answer": ["x", "y"], "answer_prefix": "A:", '
                    '"max_new_tokens": 5}\n')  # fmt: skip
    (spec,) = parse_tasks(f"file:{good}")
    samples = generate(spec, None, samples=10, length=0, seed=0)
    assert [s.questions[0].answers for s in samples] == [("a1",), ("x", "y")]
    assert samples[1].questions[0].answer_prefix == "A:" and samples[1].questions[0].max_new_tokens == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "question": "q", "answer": "a"}\n{"context": "c", "question": "q"\n')
    with pytest.raises(KVSqueezeError, match=r"bad.jsonl:2: not valid JSON"):
        parse_tasks(f"file:{bad}")
    bad.write_text('{"context": "c", "answer": "a"}\n')
    with pytest.raises(KVSqueezeError, match="'question' must be a non-empty string"):
        parse_tasks(f"file:{bad}")


@pytest.mark.model
def test_niah_prompt_length_with_the_real_tokenizer():
    from kvsqueeze.bench.runner import ModelProvider
    from kvsqueeze.prompts import prompt_ids

    tok = ModelProvider().tokenizer
    for s in generate(TaskSpec("niah"), tok, samples=4, length=2048, seed=0):
        ctx, q = prompt_ids(tok, s.context, s.questions[0].text, s.questions[0].answer_prefix)
        assert 1900 <= ctx.shape[-1] + q.shape[-1] <= 2048


@pytest.mark.parametrize(
    ("prefix", "gold"),
    [
        ('The special magic word is "', "oyster"),  # after an opening quote: no space
        ("The special magic word is ", "oyster"),  # the prefix already ends with the space
        ("", "oyster"),  # the answer starts the assistant's turn
        ("The special magic word is", " oyster"),
        ("The three words are:", " oyster"),
    ],
)
def test_gold_is_the_text_that_follows_the_answer_prefix(prefix, gold):
    assert Question("q?", ("oyster",), prefix).gold == gold


def test_evaluator_scores_the_gold_answer_as_it_follows_the_prompt(chars):
    from kvsqueeze.bench.evaluators import evaluator_for
    from kvsqueeze.prompts import split_prompt

    q = Question("Which word?", ("oyster",), 'The word is "')
    sample = Sample("file:x", "line00001", "qa", "An oyster sat in the sea. " * 4, (q,))
    evaluator = evaluator_for(tiny_model("llama"), chars, sample, query_aware=False)
    assert chars.decode(evaluator.gold_ids[0].tolist()) == "oyster"  # not ' oyster', which the model never writes
    tail = split_prompt(chars, sample.context, q.text, q.answer_prefix)[1]
    assert chars.decode(evaluator.question_ids[0].tolist()) == tail and tail.endswith('"')


@pytest.mark.model
def test_gold_tokens_follow_the_prefix_with_a_bpe_tokenizer():
    from kvsqueeze.models import load_tokenizer
    from kvsqueeze.prompts import continuation_ids, encode

    tok = load_tokenizer()
    for prefix, answer in [('The word is "', "oyster"), ("The number is", " 7342")]:
        ids = continuation_ids(tok, prefix, answer)
        assert encode(tok, prefix) + ids == encode(tok, prefix + answer)
        assert tok.decode(ids) == answer
    # a prefix ending in a space: BPE would merge " blue" across the boundary, which a model continuing the
    # prompt's tokens (the last one a space) cannot write; it writes "blue-green" on its own
    ids = continuation_ids(tok, "It is: ", "blue-green")
    assert ids == encode(tok, "blue-green") and tok.decode(ids) == "blue-green"
    assert continuation_ids(tok, 'is "', "oyster") != encode(tok, " oyster")  # what was scored before
