"""``kvsqueeze bench --threads N`` sets torch's intra-op threads before the sweep; a bad value is one line, exit 2."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import typer
from typer.testing import CliRunner

from kvsqueeze.bench import runner
from kvsqueeze.bench.cli import add_commands


def _cli() -> typer.Typer:
    app = typer.Typer()
    add_commands(app)
    return app


def test_threads_option_is_applied_before_the_sweep(tmp_path, monkeypatch):
    seen: list[int] = []

    def fake_sweep(config, executor=None, progress=True, warn=None):
        seen.append(torch.get_num_threads())
        return SimpleNamespace(rows_written=0, errors=0, cells_skipped=0, seconds=0.0)

    monkeypatch.setattr(runner, "run_sweep", fake_sweep)
    before = torch.get_num_threads()
    args = ["bench", "--methods", "snapkv", "--ratios", "0.5", "--samples", "1", "--out", str(tmp_path / "r")]
    try:
        torch.set_num_threads(1)
        assert CliRunner().invoke(_cli(), [*args, "--threads", "2"]).exit_code == 0
        torch.set_num_threads(1)
        assert CliRunner().invoke(_cli(), args).exit_code == 0  # 0 (default): left as it is
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 1]


def test_negative_threads_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(_cli(), ["bench", "--threads", "-1", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--threads must be >= 0" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
