"""LongBench, InfiniteBench and RULER (kvpress) loaders on fixture files in their published schemas, their own
metrics, Hub ids through ``datasets.load_dataset``, and kvpress' ``task`` column in ``file:`` datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.bench import metrics
from kvsqueeze.bench.runner import SweepConfig, parse_methods, read_rows, run_sweep
from kvsqueeze.bench.tasks import TaskSpec, default_lengths, generate, parse_tasks
from kvsqueeze.errors import KVSqueezeError
from tests.bench.conftest import TinyProvider

FIX = Path(__file__).parent / "fixtures"


# ---- loaders ---------------------------------------------------------------------------------------------------
def test_longbench_file_rows_take_their_own_dataset_metric_and_length(chars):
    (spec,) = parse_tasks(f"longbench:{FIX / 'longbench.jsonl'}")
    assert default_lengths(spec) == (0,)
    samples = generate(spec, chars, samples=10, length=0, seed=0)
    by_task = {s.task: s for s in samples}
    assert set(by_task) == {"longbench:hotpotqa", "longbench:trec", "longbench:passage_count", "longbench:lcc"}
    hotpot = by_task["longbench:hotpotqa"].questions[0]
    assert (hotpot.metric, hotpot.max_new_tokens, hotpot.answers) == ("longbench:qa_f1", 32, ("1889",))
    assert "When was the Eiffel Tower built?" in hotpot.text
    trec = by_task["longbench:trec"].questions[0]
    assert trec.metric == "longbench:classification/first-line" and trec.choices[:2] == ("City", "Individual")
    assert by_task["longbench:lcc"].questions[0].max_new_tokens == 64
    assert len(generate(spec, chars, samples=2, length=0, seed=0)) == 2  # --samples takes the first rows


def test_longbench_context_length_cuts_the_middle(chars):
    (spec,) = parse_tasks(f"longbench:{FIX / 'longbench.jsonl'}")
    full = generate(spec, chars, samples=1, length=0, seed=0)[0]
    cut = generate(spec, chars, samples=1, length=40, seed=0)[0]
    original = json.loads((FIX / "longbench.jsonl").read_text().splitlines()[0])["context"]
    body = cut.context.split("\n\n", 1)[1]
    assert len(chars.encode(body)) == 40 and body == original[:20] + original[-20:]
    assert cut.id != full.id  # a truncated sample is another cell


def test_infinitebench_task_from_file_name_options_and_metric(chars):
    (spec,) = parse_tasks(f"infinitebench:{FIX / 'longbook_choice_eng.jsonl'}")
    (sample,) = generate(spec, chars, samples=5, length=0, seed=0)
    q = sample.questions[0]
    assert sample.task == "infinitebench:longbook_choice_eng" and q.max_new_tokens == 40
    assert "B. Bread" in q.text and q.choices == ("Cake", "Bread", "Pie", "Soup")
    (passkey,) = generate(parse_tasks(f"infinitebench:{FIX / 'passkey.jsonl'}")[0], chars, samples=1, length=0, seed=0)
    assert passkey.questions[0].metric == "infinitebench:passkey" and passkey.questions[0].max_new_tokens == 6


def test_ruler_kvpress_schema_scores_qa_by_part_and_others_by_all(chars):
    (spec,) = parse_tasks(f"ruler:{FIX / 'ruler.jsonl'}")
    assert default_lengths(spec) == (0,)
    niah, qa = generate(spec, chars, samples=5, length=0, seed=0)
    assert (niah.task, niah.questions[0].metric, niah.questions[0].max_new_tokens) == ("ruler:niah_single_1", "all", 12)
    assert niah.questions[0].answer_prefix == " The special magic number for apple is"
    assert (qa.task, qa.questions[0].metric) == ("ruler:qa_1", "part")
    assert default_lengths(TaskSpec("ruler", "simonjegou/ruler")) == (4096,)
    with pytest.raises(KVSqueezeError, match="read whole"):
        generate(spec, chars, samples=1, length=1024, seed=0)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("longbench:no_such_dataset", "unknown LongBench dataset 'no_such_dataset'"),
        ("longbench:/no/such/file.jsonl", "dataset file not found"),
        ("infinitebench:no_task", "unknown InfiniteBench task 'no_task'"),
        ("infinitebench:./tests/bench/fixtures/longbench.jsonl", "name the file after its task"),
        ("ruler:", "give the dataset"),
        ("ruler:not a dataset id", "neither a local file nor a Hub dataset id"),
    ],
)
def test_bad_dataset_specs_are_one_line_errors(task, message):
    with pytest.raises(KVSqueezeError, match=message) as info:
        parse_tasks(task)
    assert "\n" not in str(info.value)


def test_a_row_outside_the_schema_names_the_row_and_field(tmp_path):
    bad = tmp_path / "lb.jsonl"
    good = {"input": "q", "context": "c", "answers": "a", "dataset": "hotpotqa"}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "context": 3}) + "\n")
    with pytest.raises(KVSqueezeError, match=r"row 2: field 'context' must be a str"):
        parse_tasks(f"longbench:{bad}")


# ---- Hub ids ---------------------------------------------------------------------------------------------------
def test_hub_ids_go_through_datasets_load_dataset(chars, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    rows = [json.loads(line) for line in (FIX / "ruler.jsonl").read_text().splitlines()]

    def fake_load(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    (spec,) = parse_tasks("ruler:simonjegou/ruler")
    assert len(generate(spec, chars, samples=2, length=4096, seed=0)) == 2
    assert calls == [("simonjegou/ruler", "4096", "test")]
    calls.clear()
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, name=None, split=None: calls.append((path, name, split)) or
                        [json.loads(x) for x in (FIX / "longbench.jsonl").read_text().splitlines()[:1]])  # fmt: skip
    generate(parse_tasks("longbench:hotpotqa")[0], chars, samples=1, length=0, seed=0)
    assert calls == [("THUDM/LongBench", "hotpotqa", "test")]


def test_hub_id_failures_and_missing_datasets_are_one_line_errors(chars, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'simonjegou/ruler' on the Hub (LocalEntryNotFoundError)\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(KVSqueezeError, match=r"cannot load simonjegou/ruler \(4096\), split 'test': Couldn't reach"):
        generate(parse_tasks("ruler:simonjegou/ruler")[0], chars, samples=1, length=4096, seed=0)
    from kvsqueeze.bench.tasks import hf

    monkeypatch.setattr(hf, "missing", lambda *m: list(m))
    with pytest.raises(KVSqueezeError, match=r"needs `datasets` \(the 'bench' extra\)"):
        parse_tasks("infinitebench:passkey")


# ---- metrics (each benchmark's own definitions) -----------------------------------------------------------------
def test_longbench_metrics():
    s = metrics.score
    assert s("longbench:qa_f1", "The Eiffel Tower.", ("eiffel tower",)) == 1.0  # SQuAD normalization
    assert s("longbench:qa_f1", "built in 1889", ("1889",)) == pytest.approx(0.5)  # P 1/3, R 1 → F1 0.5
    assert s("longbench:qa_f1", "in 1889", ("1890", "1889")) == pytest.approx(2 / 3)  # best gold answer
    classes = ("City", "Country", "Individual")
    assert s("longbench:classification", "City", ("City",), classes) == 1.0
    assert s("longbench:classification", "City or Country", ("City",), classes) == 0.5
    assert s("longbench:classification", "nothing", ("City",), classes) == 0.0
    assert s("longbench:classification/first-line", "Country\nCity", ("City",), classes) == 0.0  # first line only
    assert s("longbench:retrieval", "Paragraph 3", ("Paragraph 3",)) == 1.0
    assert s("longbench:retrieval", "Paragraph 3 or Paragraph 4", ("Paragraph 3",)) == 0.5
    assert s("longbench:count", "There are 7 unique paragraphs out of 9", ("7",)) == 0.5
    assert s("longbench:code_sim", "```python\n    return a * b\n", ("    return a * b",)) == 1.0
    assert s("longbench:rouge", "the cat sat on the mat", ("the cat sat on the mat",)) == pytest.approx(1.0)
    assert s("longbench:rouge", "", ("the cat",)) == 0.0


def test_infinitebench_metrics():
    s, opts = metrics.score, ("Cake", "Bread", "Pie", "Soup")
    assert s("infinitebench:passkey", "The pass key is 71432.", ("71432",)) == 1.0
    assert s("infinitebench:passkey", "It is 7 then 71432", ("71432",)) == 0.0  # the first integer counts
    assert s("infinitebench:kv_retrieval", 'The value is "a1-b2".', ("a1-b2",)) == 1.0
    assert s("infinitebench:longbook_choice_eng", "B", ("Bread",), opts) == 1.0
    assert s("infinitebench:longbook_choice_eng", "The answer is: Bread", ("Bread",), opts) == 1.0
    assert s("infinitebench:longbook_choice_eng", "I think C", ("Bread",), opts) == 0.0
    assert s("infinitebench:longbook_choice_eng", "", ("Bread",), opts) == 0.0
    assert s("infinitebench:code_debug", "B.", ("Bread",), opts) == 1.0
    assert s("infinitebench:math_find", "It is 42.", ("42",)) == 1.0
    assert s("infinitebench:math_calc", "3, 5, 9, 2", ("[3, 5, 8, 2]",)) == 0.5  # leading correct values
    assert s("infinitebench:code_run", "The result is -3", ("3",)) == 0.0 and s(
        "infinitebench:code_run", "return value: 12", ("12",)) == 1.0  # fmt: skip
    assert s("infinitebench:longbook_qa_chn", "北京。", ("北京",)) == 1.0  # characters, punctuation removed
    assert s("infinitebench:longbook_sum_eng", "a cat sat", ("a cat sat",)) == pytest.approx(1.0)


# ---- end to end on the tiny model ------------------------------------------------------------------------------
def _sweep(tmp_path, task: str):
    config = SweepConfig(tasks=parse_tasks(task), methods=parse_methods("knorm"), ratios=[0.5], samples=4,
                         lengths=None, out=tmp_path)  # fmt: skip
    run_sweep(config, TinyProvider(), progress=False)
    return read_rows(tmp_path / "results.jsonl")


def test_longbench_file_runs_and_reports_per_dataset(tmp_path):
    rows = _sweep(tmp_path, f"longbench:{FIX / 'longbench.jsonl'}")
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    assert {r["task"] for r in rows} == {"longbench:hotpotqa", "longbench:trec", "longbench:passage_count",
                                         "longbench:lcc"}  # fmt: skip
    assert all(0.0 <= r["scores"]["score"] <= 1.0 for r in rows)
    summary = (tmp_path / "summary.csv").read_text()
    assert "longbench:trec" in summary and "longbench:lcc" in summary


def test_kvpress_file_columns_report_scores_per_task(tmp_path):
    rows = _sweep(tmp_path, f"file:{FIX / 'kvpress.jsonl'}")
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    tasks = {r["task"] for r in rows}
    assert tasks == {"file:kvpress.jsonl#niah", "file:kvpress.jsonl#qa"}  # named after the file, keyed on content
    assert "#niah" in (tmp_path / "summary.csv").read_text()
