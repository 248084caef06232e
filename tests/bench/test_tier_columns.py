"""Every result row says where its bytes live: ``hot_bytes``, ``cold_bytes``, ``fetched_bytes_per_token`` (retrieval
methods keep a cold tier; every other method is all hot); the report puts hot bytes on the Pareto x axis then."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.bench.runner import SweepConfig, parse_methods, read_rows, run_sweep
from kvsqueeze.bench.tasks import parse_tasks
from tests.bench.conftest import TinyProvider

COLUMNS = ("hot_bytes", "cold_bytes", "fetched_bytes_per_token", "fetched_bytes_per_step")


def sweep(out: Path, task: str, methods: str, ratio: float = 0.5, samples: int = 1) -> list[dict]:
    config = SweepConfig(tasks=parse_tasks(task), methods=parse_methods(methods), ratios=[ratio], samples=samples,
                         lengths=[600], out=out)  # fmt: skip
    run_sweep(config, TinyProvider(), progress=False)
    rows = read_rows(out / "results.jsonl")
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    return rows


def test_rows_carry_hot_cold_and_fetched_bytes(tmp_path):
    rows = sweep(tmp_path, "niah", "snapkv,quest:page=8,residual=8", samples=2)  # two samples: batched decoding
    by = {"quest" if "quest" in r["method"] else r["method"]: r for r in rows}
    assert set(by) == {"full", "snapkv", "quest"} and len(rows) == 6
    for r in rows:
        assert all(isinstance(r[c], (int, float)) for c in COLUMNS), r
    for name in ("full", "snapkv"):  # no cold tier: every byte is hot, nothing is fetched
        r = by[name]
        assert (r["hot_bytes"], r["cold_bytes"], r["fetched_bytes_per_token"], r["fetched_bytes_per_step"]) == (
            r["cache_bytes"],
            0,
            0,
            0,
        )
    quest = by["quest"]
    assert quest["ratio"] == 0.5  # a retrieval codec sweeps ratios: what stays hot
    assert quest["cold_bytes"] > 0 and quest["fetched_bytes_per_token"] > 0
    # ratio 0.5: at most half the full cache hot, counting what one step fetches (the prefilled ids are the cache's)
    assert quest["fetched_bytes_per_step"] >= quest["fetched_bytes_per_token"]  # a question forward: one fetch
    # the question's tokens wait in the hot window beside the budget (the full cache's bytes per token each)
    slack = quest["full_bytes"] / quest["tokens_compressed"] * (quest["prompt_tokens"] - quest["tokens_compressed"])
    assert quest["hot_bytes"] + quest["fetched_bytes_per_step"] <= 0.5 * quest["full_bytes"] + slack + 8 * 700
    assert quest["hot_bytes"] + quest["cold_bytes"] == quest["cache_bytes"]  # the RAM tier is process memory
    summary = (tmp_path / "summary.md").read_text()
    assert "Hot bytes per context token" in summary and "fetched from the cold tier per step" in summary


def test_multiturn_and_multirequest_rows_meter_their_sessions(tmp_path):
    rows = sweep(tmp_path / "turns", "multiturn", "quest:page=8,residual=8")
    quest = next(r for r in rows if r["method"] != "full")
    assert quest["cold_bytes"] > 0 and quest["fetched_bytes_per_token"] > 0


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_speed_rows_with_the_cold_tier_in_ram_and_on_disk(tmp_path, tier):
    rows = sweep(tmp_path, "speed", f"quest:page=8,residual=8,tier={tier}")
    full, quest = rows
    assert quest["ratio"] == 0.5
    assert full["method"] == "full" and full["cold_bytes"] == 0 and full["fetched_bytes_per_token"] == 0
    assert quest["decode_tokens_per_second"] > 0 and quest["cold_bytes"] > 0 and quest["fetched_bytes_per_token"] > 0
    assert quest["hot_bytes"] < 0.5 * quest["full_bytes"] + 8 * 800
    if tier == "disk":  # the disk tier is files, not process memory
        assert quest["cache_bytes"] == quest["hot_bytes"]
    else:
        assert quest["cache_bytes"] == quest["hot_bytes"] + quest["cold_bytes"]
    summary = (tmp_path / "summary.md").read_text()
    assert "speed vs. the full cache" in summary and "hot bytes" in summary


def _row(method, ratio, score, nbytes, hot, cold):
    return {"key": json.dumps([method, ratio]), "task": "niah", "sample_id": "s0", "method": method, "spec": method,
            "ratio": ratio, "status": "ok", "scores": {"score": score}, "cache_bytes": nbytes, "full_bytes": 1000,
            "bytes_per_token": nbytes / 10, "tokens_compressed": 10, "hot_bytes": hot, "cold_bytes": cold,
            "fetched_bytes_per_token": 0.0 if not cold else 50.0, "meta": {}}  # fmt: skip


@pytest.mark.parametrize("cold", [0, 900])
def test_pareto_uses_hot_bytes_when_a_row_has_cold_bytes(tmp_path, monkeypatch, cold):
    from kvsqueeze.bench import report

    rows = [_row("full", None, 1.0, 1000, 1000, 0), _row("snapkv", 0.5, 0.5, 500, 500, 0),
            _row("quest", 0.75, 1.0, 1150, 250, cold)]  # fmt: skip
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = {}
    monkeypatch.setattr(report, "_save", lambda fig, path, tight=True: figures.setdefault(path.name, fig) and path)
    report.render(tmp_path)
    ax = figures["pareto_niah.png"].axes[0]
    quest = next(line for line in ax.get_lines() if line.get_label() == "quest")
    if cold:
        assert ax.get_xlabel().startswith("hot bytes") and list(quest.get_xdata()) == [25.0]
    else:
        assert ax.get_xlabel().startswith("cache bytes") and list(quest.get_xdata()) == [115.0]
