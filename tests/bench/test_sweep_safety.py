"""Sweeps never lose or double-count rows: the run lock, content-keyed resume, torn-line repair, one configuration
per directory, the context-length guard before any model work, and the one-off scoring cost recorded apart."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvsqueeze.bench.report import render
from kvsqueeze.bench.runner import SweepConfig, parse_methods, read_rows, run_lock, run_sweep
from kvsqueeze.bench.tasks import parse_tasks
from kvsqueeze.errors import KVSqueezeError
from tests.bench.conftest import TinyProvider

CONTEXT = "The quick brown fox jumps over the lazy dog. " * 12


def _config(out: Path, task: str = "niah", methods: str = "streaming_llm", **kw) -> SweepConfig:
    base = dict(tasks=parse_tasks(task), methods=parse_methods(methods), ratios=[0.5], samples=2, lengths=[600],
                out=out)  # fmt: skip
    base.update(kw)
    return SweepConfig(**base)


def _dataset(path: Path, answers: list[str]) -> Path:
    lines = [json.dumps({"context": CONTEXT, "question": f"Who? ({i})", "answer": a}) for i, a in enumerate(answers)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_second_sweep_on_a_held_directory_fails_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with run_lock(out), pytest.raises(KVSqueezeError, match=f"in use by another sweep: pid {os.getpid()}"):
        run_sweep(_config(out), TinyProvider(fail_on_load=True), progress=False)
    assert not (out / "results.jsonl").exists()  # nothing was written by the refused sweep
    result = run_sweep(_config(out), TinyProvider(), progress=False)  # the lock is free again
    assert result.rows_written == 4


def test_report_counts_each_cell_once_when_rows_are_duplicated(tmp_path):
    run_sweep(_config(tmp_path), TinyProvider(), progress=False)
    path = tmp_path / "results.jsonl"
    path.write_text(path.read_text() * 2)  # what two concurrent sweeps wrote before the lock existed
    notes = []
    render(tmp_path, warn=notes.append)
    md = (tmp_path / "summary.md").read_text()
    assert "## niah (2 samples)" in md and "4 duplicate row(s)" in notes[0]
    csv_rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert all(line.split(",")[4] == "2" for line in csv_rows[1:] if ",score," in line)  # n = 2, not 4


def test_file_dataset_is_keyed_on_content_not_on_the_path(tmp_path, monkeypatch):
    data = _dataset(tmp_path / "d.jsonl", ["fox", "dog"])
    out = tmp_path / "run"
    first = run_sweep(_config(out, task=f"file:{data}"), TinyProvider(), progress=False)
    assert first.rows_written == 4
    # the same file by another spelling of its path: nothing to rerun
    monkeypatch.chdir(tmp_path)
    same = run_sweep(_config(out, task="file:./d.jsonl"), TinyProvider(fail_on_load=True), progress=False)
    assert same.rows_written == 0 and same.cells_skipped == 4
    # one line edited: only that line's cells rerun, and the report counts the new row, not both
    _dataset(data, ["fox", "cat"])
    edited = run_sweep(_config(out, task=f"file:{data}"), TinyProvider(), progress=False)
    assert edited.rows_written == 2 and edited.cells_skipped == 2
    notes = []
    render(out, warn=notes.append)
    assert "## file:d.jsonl (2 samples)" in (out / "summary.md").read_text() and "2 duplicate row(s)" in notes[0]


def test_torn_last_line_is_cut_off_so_the_file_stays_valid_jsonl(tmp_path):
    run_sweep(_config(tmp_path, samples=1), TinyProvider(), progress=False)
    path = tmp_path / "results.jsonl"
    with path.open("a") as fh:
        fh.write('{"key": "torn')  # a writer killed mid-line
    notes = []
    again = run_sweep(_config(tmp_path, samples=2), TinyProvider(), progress=False, warn=notes.append)
    assert again.rows_written == 2 and "torn last line" in notes[0]
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(isinstance(json.loads(line), dict) for line in lines)


def test_a_directory_holds_one_configuration(tmp_path):
    run_sweep(_config(tmp_path, samples=1), TinyProvider(), progress=False)
    with pytest.raises(KVSqueezeError, match="holds results with mode 'query-agnostic'"):
        run_sweep(_config(tmp_path, samples=1, query_aware=True), TinyProvider(fail_on_load=True), progress=False)


def test_context_longer_than_the_model_is_refused_before_any_model_work(tmp_path):
    # the tiny model allows 1024 positions: 5000 tokens fail at once, before any sample is generated
    with pytest.raises(KVSqueezeError, match="allows at most 1024"):
        run_sweep(_config(tmp_path, lengths=[5000]), TinyProvider(fail_on_load=True), progress=False)
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"context": "word " * 400, "question": "q?", "answer": "a"}) + "\n")
    with pytest.raises(KVSqueezeError, match=r"file:long.jsonl line00001 .* allows at most 1024"):
        run_sweep(_config(tmp_path / "f", task=f"file:{data}"), TinyProvider(fail_on_load=True), progress=False)


def test_one_off_scoring_is_recorded_on_the_cell_that_paid_for_it(tmp_path):
    # H2O's accumulated attention is computed once per sample and reused by every ratio
    run_sweep(_config(tmp_path, methods="h2o", ratios=[0.25, 0.5], samples=1), TinyProvider(), progress=False)
    rows = {(r["method"], r["ratio"]): r for r in read_rows(tmp_path / "results.jsonl")}
    payer, reuser = rows[("h2o", 0.25)], rows[("h2o", 0.5)]
    assert payer["one_off_seconds"] > 0 and "one_off_seconds" not in reuser
    assert payer["compression_seconds"] >= payer["one_off_seconds"]
    from kvsqueeze.bench.report import one_off_seconds

    assert one_off_seconds(list(rows.values())) == {"h2o (one-off scoring)": payer["one_off_seconds"]}
