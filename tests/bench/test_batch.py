"""Batched decoding of many compressed caches equals decoding each cache alone."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.bench.batch import forward_many, greedy_many
from kvsqueeze.bench.capture import build_cache, capture_prefill, forward, greedy
from kvsqueeze.spec import parse_method
from tests.conftest import tiny_model

CELLS = [("none", None), ("snapkv", 0.5), ("h2o", 0.75), ("snapkv+adakv", 0.5), ("kivi", None),
         ("snapkv+kivi", 0.5), ("h2o+interval:every=3,budget=40", None), ("tova", 0.25)]  # fmt: skip


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_batched_rows_equal_single_rows(kind):
    model = tiny_model(kind)
    g = torch.Generator().manual_seed(11)
    ctx, question = torch.randint(3, 128, (1, 150), generator=g), torch.randint(3, 128, (1, 7), generator=g)
    prefill = capture_prefill(model, ctx)

    def caches():
        out = []
        for method, ratio in CELLS:
            spec = parse_method(method)
            ratio = ratio if ratio is not None or not spec.evicts or spec.schedule.name != "prefill" else 0.5
            out.append(build_cache(model, prefill, method, ratio))
        return out

    singles, batched = caches(), caches()
    # teacher forcing: the question, appended to every cache at once
    expected = [forward(model, c, question) for c in singles]
    got = forward_many(model, batched, question)
    for row, exp in enumerate(expected):
        torch.testing.assert_close(got[row], exp, rtol=1e-4, atol=1e-4)
    # greedy decoding with per-row budgets: rows leave the batch when they are done
    limits = [3, 8, 5, 8, 1, 6, 8, 4]
    firsts = [e[-1] for e in expected]
    alone = [greedy(model, c, f, n, eos=set()) for c, f, n in zip(singles, firsts, limits, strict=True)]
    together = greedy_many(model, batched, firsts, limits, eos=set())
    for a, b in zip(alone, together, strict=True):
        assert a.tokens == b.tokens and a.steps == b.steps
    for a, b in zip(singles, batched, strict=True):  # the same tokens are held afterwards
        assert a.nbytes() == b.nbytes() and a.get_seq_length() == b.get_seq_length()
        assert a.stats()["tokens_kept"] == b.stats()["tokens_kept"]


@pytest.mark.parametrize(
    ("task", "methods", "length", "cells"),
    [("niah", "snapkv,h2o,kivi,snapkv+adakv", 600, 8), ("fidelity", "snapkv,h2o,kivi,snapkv+adakv", 600, 8),
     ("scbench:string-multiturn", "snapkv,kivi,quest:page=8,residual=8", 700, 6),
     ("scbench:semantic-multirequest", "snapkv,kivi,quest:page=8,residual=8", 700, 6)],
)  # fmt: skip
def test_sweep_rows_batched_equal_one_by_one(tmp_path, monkeypatch, task, methods, length, cells):
    """The runner's batched path writes the rows the one-cell-at-a-time path writes (scbench: every turn's
    score and gold log-likelihood, sessions of forks)."""
    from kvsqueeze.bench.evaluators.batched import BatchedEvaluator
    from kvsqueeze.bench.runner import SweepConfig, parse_methods, read_rows, run_sweep
    from kvsqueeze.bench.tasks import parse_tasks
    from tests.bench.conftest import TinyProvider

    def sweep(out, rows_per_batch):
        monkeypatch.setattr(BatchedEvaluator, "batch_rows", rows_per_batch)
        config = SweepConfig(tasks=parse_tasks(task), methods=parse_methods(methods), ratios=[0.25, 0.5], samples=2,
                             lengths=[length], out=out)  # fmt: skip
        run_sweep(config, TinyProvider(), progress=False, render=False)
        return {r["key"]: r for r in read_rows(out / "results.jsonl")}

    alone, together = sweep(tmp_path / "alone", 1), sweep(tmp_path / "together", 4)
    assert set(alone) == set(together) and len(alone) == 2 * cells
    for key, a in alone.items():
        b = together[key]
        assert a["status"] == b["status"] == "ok"
        assert a["cache_bytes"] == b["cache_bytes"] and a.get("output") == b.get("output")
        for name, value in a["scores"].items():
            assert b["scores"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
        assert 1 < b["batched_rows"] <= 4 and "batched_rows" not in a
        assert a["fetched_bytes_per_token"] == pytest.approx(b["fetched_bytes_per_token"], rel=1e-6)
