"""The CLI: one-line errors with exit code 2 (never a traceback), the methods table, generate --json."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvsqueeze.cli import app

runner = CliRunner()


def test_methods_lists_every_registered_component():
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    names = {row["name"] for row in json.loads(result.stdout)}
    assert {"none", "random", "streaming_llm", "h2o", "snapkv", "tova", "knorm", "keydiff", "dense"} <= names


def test_methods_json_and_markdown_together_are_refused():
    result = runner.invoke(app, ["methods", "--json", "--markdown"])  # --markdown silently won before
    assert result.exit_code == 2 and "give --json or --markdown, not both" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "snapkv"], "no context"),
        (["--method", "snapkv", "--context-file", "/nonexistent/ctx.txt"], "context file not found"),
        (["--method", "snapkv", "--context", "   "], "the context is empty"),
        (["--method", "bogus", "--context", "hi"], "unknown method component 'bogus'"),
        (["--method", "snapkv", "--context", "hi", "--ratio", "1.2"], "--ratio must be in [0, 1)"),
        (["--method", "snapkv", "--context", "hi", "--budget", "0"], "--budget must be >= 1"),
        (["--method", "snapkv:window=x", "--context", "hi"], "bad parameters for 'snapkv'"),
        (["--method", "snapkv", "--context", "hi", "--dtype", "int3"], "unknown dtype 'int3'"),
        (["--method", "snapkv", "--context", "hi", "--model", "./no/such/dir"], "model path not found"),
        (["--method", "snapkv+", "--context", "hi"], "empty component in 'snapkv+'"),
        (["--method", "snapkv", "--context", "hi", "--device", "meta"], "device 'meta' holds no data"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = runner.invoke(app, ["generate", "--question", "why?", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_empty_context_file_is_rejected(tmp_path):
    empty = tmp_path / "ctx.txt"
    empty.write_text("")
    result = runner.invoke(app, ["generate", "--question", "q", "--context-file", str(empty), "--method", "knorm"])
    assert result.exit_code == 2 and "the context is empty" in result.stderr


@pytest.mark.model
def test_generate_json_reports_what_the_cache_held(tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("Alice keeps her spare key under the blue flower pot next to the door. " * 30)
    result = runner.invoke(
        app,
        ["generate", "--context-file", str(ctx), "--question", "Where is the spare key?", "--method", "snapkv",
         "--ratio", "0.5", "--max-new-tokens", "8", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    for key in ("text", "method", "ratio", "dtype", "tokens_total", "tokens_kept", "cache_bytes", "full_cache_bytes",
                "prefill_seconds", "decode_tokens_per_second"):  # fmt: skip
        assert key in row
    assert row["method"] == "snapkv" and row["dtype"] == "float32"
    assert 0.45 < row["cache_bytes"] / row["full_cache_bytes"] < 0.56


@pytest.mark.model
def test_context_shorter_than_protected_window_is_a_clear_error():
    result = runner.invoke(app, ["generate", "--context", "Hi.", "--question", "q", "--method", "snapkv:window=64"])
    assert result.exit_code == 2 and "give a longer context" in result.stderr


@pytest.mark.model
def test_budget_larger_than_context_warns_and_keeps_everything():
    result = runner.invoke(
        app,
        ["generate", "--context", "A short note about cats.", "--question", "What animal?", "--method", "knorm",
         "--budget", "5000", "--max-new-tokens", "4", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "no compression" in result.stderr
    row = json.loads(result.stdout)
    # every token is kept: the cache holds the full cache's bytes plus the token ids it records (int64, at most one
    # per token seen)
    assert 0 < row["cache_bytes"] - row["full_cache_bytes"] <= 8 * row["tokens_total"]
