"""The report renders from a hand-written results.jsonl; the CLI validates input before any model work."""

from __future__ import annotations

import csv
import json

import pytest
import typer
from typer.testing import CliRunner

from kvsqueeze.bench.cli import add_commands
from kvsqueeze.bench.report import render


def _row(task, sample, method, ratio, score, nbytes, depth=0.5, length=2048, **extra):
    return {
        "key": json.dumps([task, sample, method, ratio]), "task": task, "sample_id": sample, "method": method,
        "spec": "none" if method == "full" else method, "ratio": ratio, "status": "ok", "scores": {"score": score},
        "cache_bytes": nbytes, "full_bytes": 1000, "bytes_per_token": nbytes / 10, "tokens_compressed": 10,
        "meta": {"depth": depth, "length": length}, "model": "embedded", "dtype": "float32", "mode": "query-aware",
        "seed": 0, "versions": {"torch": "x"}, "git_commit": "abc", "decode_tokens_per_second": 10.0,
        "compression_seconds": 0.1, "prefill_seconds": 1.0, **extra,
    }  # fmt: skip


@pytest.fixture
def fixture_run(tmp_path):
    rows = []
    for i, depth in enumerate([0.0, 0.5, 1.0]):
        rows.append(_row("niah", f"s{i}", "full", None, 1.0, 1000, depth))
        rows.append(_row("niah", f"s{i}", "snapkv", 0.5, [1.0, 0.0, 1.0][i], 500, depth))
        rows.append(_row("niah", f"s{i}", "snapkv", 0.75, 0.0, 250, depth))
        rows.append(_row("niah", f"s{i}", "kivi", None, 1.0, 300, depth))
    for i in range(2):
        rows.append(_row("speed", f"p{i}", "full", None, 1.0, 1000, prefill_seconds=2.0, rss_delta_bytes=100,
                         peak_rss_bytes=10**9))  # fmt: skip
        rows.append(_row("speed", f"p{i}", "snapkv", 0.5, 1.0, 500, prefill_seconds=2.2, rss_delta_bytes=50,
                         peak_rss_bytes=10**9))  # fmt: skip
    rows.append({**_row("niah", "s0", "h2o", 0.5, 0.0, 1), "status": "error", "error": "RuntimeError: boom"})
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_report_tables_and_plots(fixture_run):
    written = {p.name for p in render(fixture_run)}
    assert {"summary.csv", "summary.md", "score_vs_ratio_niah.png", "pareto_niah.png", "niah_heatmap.png",
            "speed.png", "score_vs_ratio_speed.png"} <= written  # fmt: skip
    with (fixture_run / "summary.csv").open() as fh:
        summary = {(r["task"], r["method"], r["ratio"], r["metric"]): r for r in csv.DictReader(fh)}
    s = summary[("niah", "snapkv", "0.5", "score")]
    assert int(s["n"]) == 3 and float(s["mean"]) == pytest.approx(2 / 3) and s["interval"] == "wilson"
    assert (float(s["ci_low"]), float(s["ci_high"])) == pytest.approx((0.2077, 0.9385), abs=1e-3)  # Wilson, 2 of 3
    t = summary[("niah", "snapkv", "0.5", "compression_seconds")]
    assert t["interval"] == "t" and float(t["ci_low"]) == pytest.approx(0.1) and float(t["ci_high"]) == pytest.approx(0.1)
    ratio_to_self = summary[("speed", "full", "", "prefill_vs_full")]  # 1.0 every time, but no success count
    assert ratio_to_self["interval"] == "t" and float(ratio_to_self["ci_low"]) == pytest.approx(1.0)
    assert float(summary[("niah", "kivi", "", "cache_fraction")]["mean"]) == pytest.approx(0.3)
    assert float(summary[("speed", "snapkv", "0.5", "prefill_vs_full")]["mean"]) == pytest.approx(1.1)
    assert float(summary[("speed", "snapkv", "0.5", "bytes_vs_full")]["mean"]) == pytest.approx(0.5)
    md = (fixture_run / "summary.md").read_text()
    assert "| snapkv | 0.667 [0.208, 0.939] | 0.000 [0.000, 0.561] |  |" in md
    assert "| kivi |  |  | 1.000 [0.439, 1.000] |" in md
    assert "| niah | h2o | 0.5 | 1 | RuntimeError: boom |" in md and "speed vs. the full cache" in md


@pytest.fixture
def cli():
    app = typer.Typer()
    add_commands(app)
    return app


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "needles"], "unknown task"),
        (["--ratios", "0.5,abc"], "bad ratio"),
        (["--ratios", "1.5"], "outside (0, 1)"),
        (["--methods", "snapkv,warpdrive"], "unknown method component"),
        (["--methods", "snapkv:windw=3"], "unknown parameter"),
        (["--dtype", "int3"], "unknown dtype"),
        (["--context-length", "2k"], "bad context length"),
        (["--executor", "slurm"], "unknown executor"),
        (["--task", "longgen:many"], "bad longgen option"),
        (["--task", "niah:deep"], "unknown option 'deep'"),
        # SnapKV always keeps its 32-token window: 10 % of 300 tokens (30) cannot hold it
        (["--methods", "snapkv", "--ratios", "0.9", "--context-length", "300"], "always keeps 32 tokens"),
        (["--task", "file:/nonexistent/data.jsonl"], "dataset file not found"),
    ],
)
def test_bench_bad_input_is_one_line_exit_2(cli, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["bench", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # rejected before any work


def test_bench_malformed_jsonl(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    result = CliRunner().invoke(cli, ["bench", "--task", f"file:{bad}", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "bad.jsonl:1: not valid JSON" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_report_command(cli, fixture_run, tmp_path):
    result = CliRunner().invoke(cli, ["report", str(fixture_run)])
    assert result.exit_code == 0 and "summary.md" in result.output
    missing = CliRunner().invoke(cli, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no results.jsonl" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
