"""The sweep on a tiny random Llama: rows, resume without model work, Ctrl-C, failing methods, all task kinds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvsqueeze.bench.runner import LocalExecutor, SweepConfig, parse_methods, parse_ratios, read_rows, run_sweep
from kvsqueeze.bench.tasks import parse_tasks
from kvsqueeze.errors import KVSqueezeError
from tests.bench.conftest import TinyProvider


def _config(out: Path, task: str = "niah", methods: str = "snapkv,streaming_llm", **kw) -> SweepConfig:
    base = dict(tasks=parse_tasks(task), methods=parse_methods(methods), ratios=[0.5], samples=2, lengths=[600],
                out=out)  # fmt: skip
    base.update(kw)
    return SweepConfig(**base)


def test_sweep_rows_then_resume_does_no_model_work(tmp_path):
    config = _config(tmp_path)
    first = run_sweep(config, TinyProvider(), progress=False)
    rows = read_rows(tmp_path / "results.jsonl")
    assert first.rows_written == len(rows) == 2 * 3 and first.model_loads == 1
    assert {(r["method"], r["ratio"]) for r in rows} == {("full", None), ("snapkv", 0.5), ("streaming_llm", 0.5)}
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        assert {"score", "loglik", "kl_gold"} <= set(r["scores"]) and r["seed"] == 0
        assert r["versions"]["torch"] and "git_commit" in r and r["full_bytes"] > 0
        assert r["cache_bytes"] < r["full_bytes"] or r["method"] == "full"
    # the full row's gold logits come from the batched path, its reference from the single path: equal up to float32
    # rounding (logits within ~1000 eps of each other give a KL below (1000 eps)^2)
    kl_tol = (1000 * torch.finfo(torch.float32).eps) ** 2
    assert all(abs(r["scores"]["kl_gold"]) < kl_tol for r in rows if r["method"] == "full")
    # a rerun of the finished sweep: nothing to do, the model is never requested
    again = run_sweep(config, TinyProvider(fail_on_load=True), progress=False)
    assert again.rows_written == 0 and again.cells_skipped == 6 and again.model_loads == 0
    assert len(read_rows(tmp_path / "results.jsonl")) == 6
    for name in ("summary.csv", "summary.md", "score_vs_ratio_niah.png", "pareto_niah.png", "niah_heatmap.png"):
        assert (tmp_path / name).stat().st_size > 0
    # a new ratio runs only the new cells
    more = run_sweep(_config(tmp_path, ratios=[0.5, 0.25]), TinyProvider(), progress=False)
    assert more.rows_written == 2 * 2 and more.cells_skipped == 6


class _InterruptAfter(LocalExecutor):
    def __init__(self, n: int):
        self.n = n

    def run(self, jobs, config, provider, on_row):
        count = 0

        def guarded(row):
            nonlocal count
            if count == self.n:
                raise KeyboardInterrupt
            on_row(row)
            count += 1

        super().run(jobs, config, provider, guarded)


def test_ctrl_c_keeps_finished_rows_and_resume_completes(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, TinyProvider(), executor=_InterruptAfter(4), progress=False)
    assert len(read_rows(tmp_path / "results.jsonl")) == 4
    with (tmp_path / "results.jsonl").open("a") as fh:  # a torn line from a killed writer is ignored
        fh.write('{"key": "torn')
    rest = run_sweep(config, TinyProvider(), progress=False)
    assert rest.rows_written == 2 and rest.cells_skipped == 4
    assert len(read_rows(tmp_path / "results.jsonl")) == 6


def test_failing_method_is_recorded_and_the_sweep_goes_on(tmp_path):
    # snapkv always keeps its 32-token window: at ratio 0.97 of ~600 tokens the budget (18) is too small
    config = _config(tmp_path, ratios=[0.97], methods="snapkv,random")
    result = run_sweep(config, TinyProvider(), progress=False)
    rows = read_rows(tmp_path / "results.jsonl")
    failed = [r for r in rows if r["status"] == "error"]
    assert result.errors == len(failed) == 2 and {r["method"] for r in failed} == {"snapkv"}
    assert "budget" in failed[0]["error"]
    assert {r["method"] for r in rows if r["status"] == "ok"} == {"full", "random"}
    assert "failed cells" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("task", ["vt", "cwe", "fwe", "fidelity", "multiturn", "speed", "niah:multiquery"])
def test_every_task_kind_runs(tmp_path, task):
    config = _config(tmp_path, task=task, methods="tova", samples=1, lengths=[700], query_aware=task == "vt")
    run_sweep(config, TinyProvider(), progress=False)
    rows = read_rows(tmp_path / "results.jsonl")
    assert [r["status"] for r in rows] == ["ok", "ok"], [r.get("error") for r in rows]
    tova = rows[1]
    assert tova["cache_bytes"] < tova["full_bytes"]
    if task == "fidelity":
        assert rows[0]["scores"]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[0]["scores"]["top1"] == 1.0
        assert tova["scores"]["kl"] > 0 and tova["scores"]["score"] == tova["scores"]["kl"]
    if task == "multiturn":
        assert {"turn1", "turn2", "turn3"} <= set(tova["scores"]) and len(tova["output"]) == 3
    if task == "speed":
        assert tova["new_tokens"] == 32 and tova["peak_cache_bytes"] >= tova["cache_bytes"] > 0
        assert tova["gpu_peak_bytes"] is None and tova["device"] == "cpu"  # CUDA only
        assert "speed vs. the full cache" in (tmp_path / "summary.md").read_text()
        assert (tmp_path / "speed.png").stat().st_size > 0


def test_file_task(tmp_path):
    data = tmp_path / "d.jsonl"
    context = "The quick brown fox jumps over the lazy dog. " * 15
    data.write_text(json.dumps({"context": context, "question": "Who jumps?", "answer": "fox"}) + "\n")
    run_sweep(_config(tmp_path / "run", task=f"file:{data}", methods="knorm"), TinyProvider(), progress=False)
    rows = read_rows(tmp_path / "run" / "results.jsonl")
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[0]["expected"] == ["fox"]


def test_parse_inputs():
    assert parse_methods("snapkv:window=16,kernel=3,h2o,full") == ["snapkv:window=16,kernel=3", "h2o"]
    with pytest.raises(KVSqueezeError, match="unknown method component"):
        parse_methods("snapkv,nosuch")
    assert parse_ratios("0.25, 0.5") == [0.25, 0.5]
    for bad in ("0.5,1.2", "a,b", "", "0"):
        with pytest.raises(KVSqueezeError):
            parse_ratios(bad)
