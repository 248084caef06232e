"""The report renders from a hand-written results.jsonl; the CLI validates input before any model work."""

from __future__ import annotations

import csv
import json

import pytest
import typer
from typer.testing import CliRunner

from kvsqueeze.bench.cli import add_commands
from kvsqueeze.bench.report import render
from kvsqueeze.errors import KVSqueezeError


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
        rows.append(_row("speed", f"p{i}", "full", None, 1.0, 1000, prefill_seconds=2.0, peak_cache_bytes=1000,
                         gpu_peak_bytes=10**9))  # fmt: skip
        rows.append(_row("speed", f"p{i}", "snapkv", 0.5, 1.0, 500, prefill_seconds=2.2, peak_cache_bytes=1500,
                         gpu_peak_bytes=10**9))  # fmt: skip
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
    assert t["interval"] == "t" and float(t["ci_low"]) == pytest.approx(0.1) == float(t["ci_high"])
    ratio_to_self = summary[("speed", "full", "", "prefill_vs_full")]  # 1.0 every time, but no success count
    assert ratio_to_self["interval"] == "t" and float(ratio_to_self["ci_low"]) == pytest.approx(1.0)
    assert float(summary[("niah", "kivi", "", "cache_fraction")]["mean"]) == pytest.approx(0.3)
    assert float(summary[("speed", "snapkv", "0.5", "prefill_vs_full")]["mean"]) == pytest.approx(1.1)
    assert float(summary[("speed", "snapkv", "0.5", "bytes_vs_full")]["mean"]) == pytest.approx(0.5)
    assert float(summary[("speed", "snapkv", "0.5", "peak_vs_full")]["mean"]) == pytest.approx(1.5)
    assert float(summary[("speed", "snapkv", "0.5", "gpu_peak_vs_full")]["mean"]) == pytest.approx(1.0)
    md = (fixture_run / "summary.md").read_text()
    assert "| snapkv | 0.667 [0.208, 0.939] | 0.000 [0.000, 0.561] |  |" in md
    assert "| kivi |  |  | 1.000 [0.439, 1.000] |" in md
    assert "| niah | h2o | 0.5 | 1 | RuntimeError: boom |" in md and "speed vs. the full cache" in md
    assert "| method | ratio | prefill time | decode tok/s | bytes held | peak cache bytes | GPU peak memory |" in md
    assert "RSS" not in md


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
        # options checked when the spec is parsed, not when a cell runs (a failed row and exit 0 otherwise)
        (["--methods", "snapkv,quest:select=bogus"], "use select=token or select=step"),
        (["--methods", "snapkv+kivi:group=0"], "kivi: group must be >= 1"),
        (["--methods", "snapkv:window=8,window=16"], "parameter 'window' given twice"),
        (["--methods", ","], "no method given"),
        (["--task", "rag", "--reuse", ","], "no reuse strategy given"),
        # codec parameters that depend on the model's head dimension (64): checked from its config up front
        (["--methods", "snapkv+kivi:group=48"], "must divide the head dimension 64"),
        (["--methods", "bfp:block=24"], "bfp needs a block dividing head_dim 64"),
        (["--methods", "snapkv+cskv:rank_k=96"], "exceed the head dim 64"),
        (["--methods", "quest:tier=disk,dir=/nonexistent/cold"], "is not a directory"),
        (["--out", ""], "--out is empty"),  # the last --out wins: typer would read '' as the current directory
    ],
)
def test_bench_bad_input_is_one_line_exit_2(cli, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["bench", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # rejected before any work


def test_bench_help_lists_every_registered_task_and_dtype(cli):
    from kvsqueeze.bench.tasks import DATASETS, GENERATORS
    from kvsqueeze.models import DTYPES

    params = {p.name: p.help for p in typer.main.get_command(cli).commands["bench"].params}
    names = {part.strip().split(":")[0].split("[")[0] for part in params["task"].split(";")[0].split(",")}
    assert names == {*GENERATORS, *DATASETS, "file"}  # scbench, convqa, longbench … were missing
    assert all(f"{name}[:" in params["task"] for name in ("niah", "multiturn", "longgen", "rag", "scbench", "convqa"))
    assert all(dtype in params["dtype"] for dtype in (*DTYPES, "auto"))


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
    results = fixture_run / "results.jsonl"
    a_file = CliRunner().invoke(cli, ["report", str(results)])  # the results file instead of its directory
    assert a_file.exit_code == 2 and f"{results} is a file, not a run directory" in a_file.output
    assert f"kvsqueeze report {fixture_run}" in a_file.output and len(a_file.output.strip().splitlines()) == 1


def _tables(md: str) -> list[list[str]]:
    tables, current = [], []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_every_summary_section_is_a_well_formed_table(fixture_run, tmp_path):
    render(fixture_run)
    no_ratio = tmp_path / "noratio"  # only methods without a ratio: the header once had more cells than its rule
    no_ratio.mkdir()
    (no_ratio / "results.jsonl").write_text(
        "".join(json.dumps(_row("niah", f"s{i}", m, None, 1.0, 100)) + "\n" for i in range(2) for m in ("full", "kivi"))
    )
    render(no_ratio)
    for run in (fixture_run, no_ratio):
        md = (run / "summary.md").read_text()
        tables = _tables(md)
        assert len(tables) >= 2
        for table in tables:
            widths = {line.count("|") for line in table}
            assert len(widths) == 1, table  # header, rule and rows have the same number of cells
            assert set(table[1].replace("|", "")) == {"-"}
    assert "## failed cells (1)" in (fixture_run / "summary.md").read_text()  # a table, not a bullet list


def test_single_sample_has_no_interval(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps(_row("niah", "s0", "full", None, 1.0, 100)) + "\n")
    render(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert "| full | 1.000 (n=1) |" in md and "±" not in md


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "holds no result rows"),
        (b"[1, 2, 3]\n", "holds no result rows (1 malformed line(s) skipped (line 1: a JSON list, not an object))"),
        (b'{"task": "niah", "sample_id": "s0", "status": "ok"}\n', "field 'method' missing"),
        (b"\x89PNG\r\n\x1a\n\x00\x00binary\xff\xfe\n", "not UTF-8 text"),
    ],
)
def test_report_of_nothing_usable_is_one_line_exit_2(cli, tmp_path, content, message):
    (tmp_path / "results.jsonl").write_bytes(content)
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_report_skips_malformed_lines_and_says_so(cli, fixture_run):
    with (fixture_run / "results.jsonl").open("ab") as fh:
        fh.write(b'["an", "array"]\n{"task": "niah"}\n\xff\xfe binary \x00\n{"key": "torn')
    result = CliRunner().invoke(cli, ["report", str(fixture_run)])
    assert result.exit_code == 0, result.output
    assert "4 malformed line(s) skipped (line 18: a JSON list, not an object)" in result.output
    assert "| snapkv | 0.667 [0.208, 0.939] |" in (fixture_run / "summary.md").read_text()


def test_report_where_every_cell_failed_exits_2_and_lists_them(cli, tmp_path):
    rows = [{**_row("niah", f"s{i}", "snapkv", 0.5, 0.0, 1), "status": "error", "error": "RuntimeError: boom"}
            for i in range(2)]  # fmt: skip
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no cell in" in result.output and "2 failed" in result.output
    assert "| niah | snapkv | 0.5 | 2 | RuntimeError: boom |" in (tmp_path / "summary.md").read_text()


def test_pareto_lines_have_distinct_markers_and_speed_plot_has_a_one_off_bar(tmp_path, monkeypatch):
    from kvsqueeze.bench import report

    rows = []
    for i in range(2):  # three methods on exactly the same points: only markers and line styles tell them apart
        # the full rows decoded in a batch: no tok/s of their own, so that panel lacks the top row
        rows.append(_row("niah", f"s{i}", "full", None, 1.0, 1000, decode_tokens_per_second=None))
        for method in ("a", "b", "c"):
            for ratio, nbytes in ((0.25, 750), (0.5, 500)):
                extra = {"one_off_seconds": 0.4, "compression_seconds": 0.5} if method == "a" and ratio == 0.25 else {}
                rows.append(_row("niah", f"s{i}", method, ratio, 1.0, nbytes, **extra))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = {}

    def keep(fig, path, tight=True):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(report, "_save", keep)
    report.render(tmp_path)
    lines = [ln for ln in figures["pareto_niah.png"].axes[0].get_lines() if ln.get_label() in ("a", "b", "c")]
    assert len({(ln.get_marker(), ln.get_linestyle()) for ln in lines}) == 3
    speed = figures["speed.png"]
    compression = next(ax for ax in speed.axes if ax.get_title() == "compression s")
    labels = [t.get_text() for t in speed.axes[0].get_yticklabels()]
    assert len({ax.get_ylim() for ax in speed.axes}) == 1  # every panel shows the same rows
    widths = {labels[round(bar.get_y() + bar.get_height() / 2)]: bar.get_width() for bar in compression.patches}
    assert widths["a (one-off scoring)"] == pytest.approx(0.4)
    assert widths["a@0.25"] == pytest.approx(0.1)  # its own selection work: 0.5 s measured minus the one-off 0.4 s


def test_bench_out_that_is_a_file_or_not_writable(cli, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    for out, message in [(taken, "is an existing file; give a directory"), (taken / "sub", "cannot write to --out")]:
        result = CliRunner().invoke(cli, ["bench", "--out", str(out), "--methods", "knorm"])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_bench_out_read_only_directory(tmp_path, monkeypatch):
    from pathlib import Path

    from kvsqueeze.bench.runner import prepare_out

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", refuse)  # what a read-only directory does for a non-root user
    with pytest.raises(KVSqueezeError, match=r"cannot write to --out .*: Permission denied; choose a writable"):
        prepare_out(tmp_path / "ro")


def test_report_into_a_read_only_directory(fixture_run, monkeypatch):
    from pathlib import Path

    real_open = Path.open

    def refuse_writes(self, mode="r", *args, **kwargs):
        if "w" in mode:
            raise PermissionError(13, "Permission denied")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse_writes)
    with pytest.raises(KVSqueezeError, match="cannot write the report into"):
        render(fixture_run)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"context": "Café crème", "question": "q", "answer": "a"}\n'.encode("latin-1"), "d.jsonl:1: not UTF-8"),
        (b"[" * 100_000 + b"\n", "nested too deeply"),
    ],
)
def test_bench_file_dataset_encoding_and_nesting(cli, tmp_path, content, message):
    data = tmp_path / "d.jsonl"
    data.write_bytes(content)
    result = CliRunner().invoke(cli, ["bench", "--task", f"file:{data}", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bench_file_dataset_that_is_a_directory(cli, tmp_path):
    result = CliRunner().invoke(cli, ["bench", "--task", f"file:{tmp_path}", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "is a directory; give --task file:PATH.jsonl" in result.output


def test_bench_quiets_the_hub_client():
    import logging

    from huggingface_hub.utils import logging as hub_logging

    from kvsqueeze.bench.cli import _quiet

    _quiet()  # an unreachable Hub id then prints one error line, not a warning per retry
    assert hub_logging.get_logger().getEffectiveLevel() >= logging.ERROR


def test_bench_on_a_non_causal_model_directory(cli, tmp_path):
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=8, d_ff=64, vocab_size=64).save_pretrained(tmp_path / "t5")
    result = CliRunner().invoke(cli, ["bench", "--model", str(tmp_path / "t5"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not a causal (decoder-only) language model" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


@pytest.mark.model
def test_bench_context_length_beyond_the_model(cli, tmp_path):
    result = CliRunner().invoke(cli, ["bench", "--context-length", "100000", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "allows at most 8192" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
