"""The ``longgen`` task: the full cache's greedy generation teacher-forced under each method
(``kvsqueeze.bench.evaluators.longgen``)."""

from __future__ import annotations

import math

import pytest

from kvsqueeze.bench.evaluators import longgen
from kvsqueeze.bench.runner import SweepConfig, parse_methods, read_rows, run_sweep
from kvsqueeze.bench.tasks import TaskSpec, generate, parse_tasks
from kvsqueeze.errors import KVSqueezeError
from tests.bench.conftest import TinyProvider

N = 12


def test_longgen_option_is_the_generated_length(chars):
    (spec,) = parse_tasks("longgen:1000")
    (sample,) = generate(spec, chars, samples=1, length=600, seed=0)
    assert sample.kind == "longgen" and sample.meta["n_tokens"] == 1000
    assert sample.questions[0].max_new_tokens == 1000 and "/1000/" in sample.id
    assert generate(TaskSpec("longgen"), chars, samples=1, length=600, seed=0)[0].meta["n_tokens"] == 256
    for bad in ("longgen:abc", "longgen:1", "longgen:-5"):
        with pytest.raises(KVSqueezeError, match=r"e\.g\. longgen:1000"):
            parse_tasks(bad)


def test_longgen_sweep_rows(tmp_path):
    schedule = "streaming_llm:sinks=2+interval:every=4,budget=32"
    config = SweepConfig(tasks=parse_tasks(f"longgen:{N}"), methods=parse_methods(f"snapkv:window=8,{schedule}"),
                         ratios=[0.5], samples=1, lengths=[300], out=tmp_path)  # fmt: skip
    provider = TinyProvider()
    run_sweep(config, provider, progress=False)
    rows = {(r["method"], r["ratio"]): r for r in read_rows(tmp_path / "results.jsonl")}
    # a schedule with its own budget runs once (ratio null), the scorer once per ratio
    assert set(rows) == {("full", None), ("snapkv:window=8", 0.5), (schedule, None)}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("error") for r in rows.values()]
    full, snap, sched = rows[("full", None)], rows[("snapkv:window=8", 0.5)], rows[(schedule, None)]
    prompt = full["prompt_tokens"]
    for r in rows.values():
        assert r["generated_tokens"] == N and r["tokens_compressed"] == prompt + N - 1
        assert r["decode_vs_full"] > 0 and 0.0 <= r["scores"]["top1"] <= 1.0
    # the full cache reproduces its own generation; it holds every token at the end
    assert full["scores"]["top1"] == 1.0 and full["scores"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert full["tokens_kept_mean"] == prompt + N - 1 and full["cache_bytes"] == full["full_bytes"]
    # snapkv evicts half the prompt once, then appends every generated token
    assert snap["tokens_kept_mean"] == math.ceil(prompt * 0.5) + N - 1 and snap["scores"]["kl"] > 0
    # the decoding schedule stays inside budget + every - 1 tokens per head
    assert sched["tokens_kept_mean"] <= 32 + 4 - 1 and sched["cache_bytes"] < snap["cache_bytes"]
    # the row is bench.evaluators.longgen's result for the same prompt (not a re-implementation)
    import torch

    from kvsqueeze.prompts import prompt_ids

    (sample,) = generate(config.tasks[0], provider.tokenizer, samples=1, length=300, seed=0)
    q0 = sample.questions[0]
    ctx, q = prompt_ids(provider.tokenizer, sample.context, q0.text, q0.answer_prefix)
    direct = longgen(provider.model, provider.tokenizer, schedule, torch.cat([ctx, q], dim=-1), n_tokens=N)
    assert direct["top1_agreement"] == sched["scores"]["top1"]
    assert direct["kl_mean"] == pytest.approx(sched["scores"]["kl"], rel=1e-5)
    assert direct["tokens_held_end"] == sched["tokens_kept_mean"]
    md = (tmp_path / "summary.md").read_text()
    assert "top-1 agreement with the full cache's generation" in md and "| tokens held |" in md
