"""``--executor ray`` on a local Ray started by the test (Ray is a pinned dev dependency: no skip); a bad worker count
or a Ray that cannot start is one line."""

from __future__ import annotations

import os
import sys

import pytest
import ray
from typer.testing import CliRunner

from kvsqueeze.bench.runner import SweepConfig, parse_methods, read_rows, run_sweep
from kvsqueeze.bench.tasks import parse_tasks
from kvsqueeze.cli import app
from kvsqueeze.errors import KVSqueezeError
from tests.bench.conftest import TinyProvider


def test_ray_executor_matches_local(tmp_path):
    from kvsqueeze.bench.ray_executor import RayExecutor

    def config(out):
        return SweepConfig(tasks=parse_tasks("niah"), methods=parse_methods("snapkv"), ratios=[0.5], samples=2,
                           lengths=[600], out=out)  # fmt: skip

    run_sweep(config(tmp_path / "local"), TinyProvider(), progress=False, render=False)
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
    # address="local": always a fresh private Ray (never a cluster another process started on this machine);
    # a small object store keeps start-up quick on a shared 2-core machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False, runtime_env=env)  # fmt: skip
    try:
        executor = RayExecutor(provider_factory=TinyProvider, num_workers=2)
        result = run_sweep(config(tmp_path / "ray"), TinyProvider(), executor=executor, progress=False, render=False)
        rag = SweepConfig(tasks=parse_tasks("rag:4"), methods=[], ratios=[0.5], samples=3, lengths=[700],
                          out=tmp_path / "rag-ray", reuse=["kvlink"], store=str(tmp_path / "chunks"))  # fmt: skip
        run_sweep(rag, TinyProvider(), executor=executor, progress=False, render=False)
    finally:
        ray.shutdown()
    local = {r["key"]: r for r in read_rows(tmp_path / "local" / "results.jsonl")}
    remote = {r["key"]: r for r in read_rows(tmp_path / "ray" / "results.jsonl")}
    assert result.rows_written == 4 and set(local) == set(remote)
    for key, row in local.items():
        assert remote[key]["status"] == "ok"
        assert remote[key]["output"] == row["output"] and remote[key]["cache_bytes"] == row["cache_bytes"]
        assert remote[key]["scores"]["loglik"] == pytest.approx(row["scores"]["loglik"], abs=1e-4)
    # resume works the same way: nothing left to run, no Ray needed
    again = run_sweep(config(tmp_path / "ray"), TinyProvider(fail_on_load=True), executor=executor, progress=False,
                      render=False)  # fmt: skip
    assert again.rows_written == 0
    # the workers shared one chunk store: a later local sweep over it encodes nothing
    ray_rows = read_rows(tmp_path / "rag-ray" / "results.jsonl")
    assert len(ray_rows) == 6 and all(r["status"] == "ok" for r in ray_rows)
    rag.out = tmp_path / "rag-local"
    run_sweep(rag, TinyProvider(), progress=False, render=False)
    linked = [r for r in read_rows(rag.out / "results.jsonl") if r["method"] == "reuse:kvlink"]
    assert len(linked) == 3 and all(r["chunk_misses"] == 0 for r in linked)


def test_ray_workers_load_the_model_on_the_sweeps_device():
    from kvsqueeze.bench.ray_executor import default_factory, wants_gpu

    assert default_factory(None, "float32", "cpu").device == "cpu"  # --device reaches the worker's provider
    assert default_factory(None, "float32", "cuda:1").device == "cuda:1"
    assert wants_gpu("cuda", 0) and wants_gpu("cuda:1", 4) and wants_gpu("auto", 2)
    assert not wants_gpu("cpu", 8) and not wants_gpu("auto", 0)  # --device cpu on a GPU cluster stays on the CPU


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_a_bad_worker_count_is_refused_when_the_executor_is_created(monkeypatch, value):
    from kvsqueeze.bench.runner import get_executor

    monkeypatch.setenv("KVSQUEEZE_RAY_WORKERS", value)
    with pytest.raises(
        KVSqueezeError, match=r"KVSQUEEZE_RAY_WORKERS must be a whole number >= 1, got .* \(Ray workers\); set e.g."
    ) as err:
        get_executor("ray")
    assert "\n" not in str(err.value)


def test_bench_refuses_a_bad_worker_count_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSQUEEZE_RAY_WORKERS", "many")
    result = CliRunner().invoke(app, ["bench", "--executor", "ray", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "KVSQUEEZE_RAY_WORKERS must be" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_a_ray_that_cannot_start_is_one_line(monkeypatch):
    from kvsqueeze.bench.ray_executor import RayExecutor

    def refuse(**kwargs):
        raise ConnectionError("Could not find any running Ray instance at 10.0.0.9:6379.\nmore detail")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(KVSqueezeError, match=r"cannot start or reach Ray .*10\.0\.0\.9.*; check RAY_ADDRESS") as err:
        RayExecutor(num_workers=1).run([], None, None, lambda row: None)
    assert "\n" not in str(err.value)
