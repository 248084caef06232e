"""The ``rag`` task and its evaluator: prompts of pooled documents holding one fact, every document reused across
samples through the sweep's chunk store; reuse strategies compared with the full recompute (KL 0 for the full
recompute and for prefix reuse, within float32 tolerance), recomputed fractions as each strategy computes them."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

from kvsqueeze import KVSqueezeError, store
from kvsqueeze.bench.capture import forward
from kvsqueeze.bench.runner import SweepConfig, parse_methods, parse_reuse_list, read_rows, run_sweep
from kvsqueeze.bench.tasks import TaskSpec, generate, parse_tasks
from kvsqueeze.cli import app
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.prompts import segmented_prompt
from kvsqueeze.reuse import ape
from kvsqueeze.reuse.rag import COVERED, ChunkCaches, PrefixReuse, Request, parse_reuse
from tests.bench.conftest import TinyProvider
from tests.conftest import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
FACT = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.")


def test_each_prompt_holds_one_fact_and_documents_recur_across_samples(chars):
    samples = generate(TaskSpec("rag", "4"), chars, samples=12, length=1024, seed=0)
    uses = Counter(doc for s in samples for doc in s.documents)
    for s in samples:
        assert len(s.documents) == 4 and s.context == "".join(d + "\n\n" for d in s.documents)
        facts = FACT.findall(s.context)
        assert facts == [(s.meta["key"], s.questions[0].answers[0])]  # one fact: the asked one
        assert FACT.search(s.documents[s.meta["target_place"]])  # where the sample says
        assert len(chars.encode(s.context)) <= 1024
    assert sum(n > 1 for n in uses.values()) >= 6  # the pool is reused: most documents recur
    assert {s.meta["target_place"] for s in samples} == {0, 1, 2, 3}
    with pytest.raises(KVSqueezeError, match="valid options: 4, 5, 6, 7, 8"):
        parse_tasks("rag:9")


def test_document_pieces_do_not_depend_on_their_neighbours(chars):
    a = segmented_prompt(chars, ["first doc.", "second doc."], "Q?", "A:")
    b = segmented_prompt(chars, ["second doc.", "third doc."], "Q?", "A:")
    assert torch.equal(a[1][1], b[1][0]) and torch.equal(a[0], b[0]) and a[0].shape[-1] > 0


def _request(seed: int, docs: list[torch.Tensor]) -> Request:
    g = torch.Generator().manual_seed(seed)
    return Request(torch.randint(3, 128, (1, 6), generator=g), tuple(docs), torch.randint(3, 128, (1, 5), generator=g))


def _doc(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = 64 * torch.finfo(torch.float32).eps * float(b.abs().max())  # one prefill vs. segment by segment
    return torch.allclose(a, b, atol=tol, rtol=0)


def test_prefix_reuse_finds_a_later_requests_first_documents_and_matches_the_full_recompute():
    model = tiny_model("llama")
    chunks = ChunkCaches(store.open("memory://"), model)
    d1, d2, d3 = _doc(20, 1), _doc(18, 2), _doc(15, 3)
    head = _request(0, []).head
    first = Request(head, (d1, d2), _doc(5, 9))
    got = PrefixReuse().build(model, first, chunks)
    assert got.recomputed == first.context_ids.shape[-1]  # nothing stored yet
    later = Request(head, (d1, d2, d3), _doc(5, 10))
    reused = PrefixReuse().build(model, later, chunks)
    assert reused.recomputed == 15  # head, d1 and d2 came from the store
    full = CompressedCache(model, "none")
    ref = forward(model, full, later.prompt_ids, keep=1)[-1]
    assert _close(forward(model, reused.cache, later.tail, keep=1)[-1], ref)


def test_ape_from_stored_chunks_is_ape_computed_now():
    model = tiny_model("llama")
    chunks = ChunkCaches(store.open("memory://"), model)
    request = _request(1, [_doc(12, 4), _doc(9, 5)])
    parse_reuse("ape").warm(request, chunks)
    assert chunks.misses == 3 and chunks.hits == 0  # the head alone, each document after the head
    stored = parse_reuse("ape").build(model, request, chunks).cache
    assert chunks.hits == 3
    now = ape.ape_cache(model, request.head, list(request.documents))
    a = forward(model, stored, request.tail, keep=1)
    b = forward(model, now, request.tail, keep=1)
    assert torch.equal(a, b)  # the store's round trip is bit for bit and the combination the same code


def test_kvshare_is_warmed_until_its_index_holds_the_documents():
    model = tiny_model("llama")
    chunks = ChunkCaches(store.open("memory://"), model)
    strategy = parse_reuse("kvshare")
    first = _request(1, [_doc(20, 4), _doc(20, 5)])
    strategy.warm(first, chunks)
    assert chunks.misses == 1  # nothing held: one request with the documents in another order
    strategy.warm(first, chunks)
    assert chunks.misses == 1  # every document token is in the index now
    partly = _request(2, [_doc(20, 4), _doc(20, 6)])  # one document held, one new
    strategy.warm(partly, chunks)
    assert chunks.misses == 2  # half the documents held is not "chunks in store"
    _, matched = strategy.index(chunks).sources(partly.context_ids)
    assert matched[partly.head.shape[-1] :].float().mean() >= COVERED


def test_a_rag_sweep_reuses_chunks_across_samples_and_through_a_shared_store(tmp_path):
    shared = str(tmp_path / "chunks")
    reuse = parse_reuse_list("prefix,kvlink,kvlink:recompute=4,ape,cachecraft,kvshare")
    config = SweepConfig(tasks=parse_tasks("rag:4"), methods=[], ratios=[0.5], samples=3, lengths=[700],
                         out=tmp_path / "a", reuse=reuse, store=shared)  # fmt: skip
    run_sweep(config, TinyProvider(), progress=False)
    rows = read_rows(tmp_path / "a" / "results.jsonl")
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    by = {(r["sample_id"], r["method"]): r for r in rows}
    ids = sorted({r["sample_id"] for r in rows})
    assert len(rows) == 3 * 7
    for i in ids:
        full, link4 = by[(i, "full")], by[(i, "reuse:kvlink:recompute=4")]
        assert full["recomputed_fraction"] == 1.0 and full["scores"]["kl_gold"] == pytest.approx(0, abs=1e-6)
        assert (
            by[(i, "reuse:kvlink")]["recomputed_fraction"] == 0.0 and by[(i, "reuse:ape")]["recomputed_fraction"] == 0
        )
        assert link4["recomputed_fraction"] == pytest.approx(16 / full["context_tokens"])
        assert by[(i, "reuse:kvlink")]["scores"]["kl_gold"] > 0  # documents encoded alone are another computation
        assert 0 < by[(i, "reuse:cachecraft")]["recomputed_fraction"] < 1  # a part, never all
        assert by[(i, "reuse:kvshare")]["decode_recomputed_tokens"] > 0  # its decode stage ran
    # the 4 documents encoded once; the head alone is the prefix strategy's first stored boundary (the same cache)
    assert by[(ids[0], "reuse:kvlink")]["chunk_misses"] == 4 and by[(ids[0], "reuse:kvlink")]["chunk_hits"] == 1
    later = [by[(i, "reuse:kvlink")] for i in ids[1:]]
    assert sum(r["chunk_hits"] for r in later) > 0  # documents of the pool recur: loaded, not encoded
    # another sweep over the same store: every chunk is stored already
    again = SweepConfig(**{**config.__dict__, "out": tmp_path / "b"})
    run_sweep(again, TinyProvider(), progress=False)
    for r in read_rows(tmp_path / "b" / "results.jsonl"):
        if r["method"] in ("reuse:kvlink", "reuse:ape"):
            assert r["chunk_misses"] == 0 and r["chunk_hits"] > 0
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "Reuse vs. the full recompute" in summary and "reuse:kvlink:recompute=4" in summary


def test_bad_reuse_input_is_one_line(tmp_path):
    for text, match in [("nope", "unknown reuse strategy"), ("kvlink:recompute=-1", "recompute must be >= 0"),
                        ("kvlink:window=3", "valid parameters: recompute"), ("ape:temperature=x", "must be a float"),
                        ("ape:scale=0", "scale must be > 0"),
                        ("ape:temperature=nan", "temperature must be a finite number"),
                        ("ape:scale=inf", "scale must be a finite number"),
                        ("cachecraft:max_deviation=nan", "max_deviation must be a finite number"),
                        ("ape:temperature=0.5,temperature=0.8", "parameter 'temperature' given twice"),
                        ("kvlink:recompute=4,recompute=8", "parameter 'recompute' given twice")]:  # fmt: skip
        with pytest.raises(KVSqueezeError, match=match):
            parse_reuse_list(text)
    assert parse_reuse_list("kvlink:recompute=0,ape:temperature=1,scale=0.5,full") == [
        "kvlink", "ape:scale=0.5,temperature=1"]  # fmt: skip
    assert parse_methods("snapkv") == ["snapkv"]
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--task", "niah", "--reuse", "kvlink", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--task rag only" in result.output
    result = runner.invoke(app, ["bench", "--task", "rag", "--store", "redis://127.0.0.1:1", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "cannot reach the Redis store" in result.output
