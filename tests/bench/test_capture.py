"""The captured-prefill path (prefill once, compress from recorded tensors) equals the live path."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.bench.capture import build_cache, capture_prefill, forward, greedy
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.spec import parse_method
from tests.bench.conftest import CharTokenizer
from tests.conftest import tiny_model

METHODS = [
    "none",
    "snapkv",
    "h2o",
    "streaming_llm",
    "tova",
    "knorm",
    "keydiff",
    "snapkv+pyramidkv",
    "snapkv+adakv",
    "kivi",
    "snapkv+kivi",
    # decoding-time schedules: the captured prefill runs their per-pass step exactly as the live pass does
    "h2o+interval:every=4,budget=64",
    "lazyeviction:budget=64,window=8",
    "triattention:budget=64,every=4",
]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _prompt(n: int = 160, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, n), generator=g)


def live_cache_after_prefill(model, method: str, ratio: float | None, ids: torch.Tensor) -> int:
    """Bytes the live path holds right after the prefill forward (before any decoding step)."""
    cache = CompressedCache(model, method, ratio=ratio)
    cache.expect(ids)  # the tokens are known, as in a captured build
    forward(model, cache, ids, keep=1)
    return cache.nbytes()


@pytest.mark.parametrize("method", METHODS)
def test_captured_path_equals_live_generate(model, method):
    """Query-aware: generate() compressing during its forward pass vs. build_cache() from one captured prefill."""
    spec = parse_method(method)
    ratio = 0.5 if spec.evicts and spec.schedule.name == "prefill" else None  # decoding schedules: their budget
    ids = _prompt()
    live_cache = CompressedCache(model, method, ratio=ratio)
    live_cache.expect(ids)
    with torch.no_grad():
        live = model.generate(
            ids, attention_mask=torch.ones_like(ids), past_key_values=live_cache, max_new_tokens=6,
            do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
    prefill = capture_prefill(model, ids)
    cache = build_cache(model, prefill, method, ratio)
    # the compressed caches are identical before decoding starts: same kept tokens, same bytes
    assert cache.nbytes() < cache.full_nbytes() or method == "none"
    assert cache.nbytes() == live_cache_after_prefill(model, method, ratio, ids)
    out = greedy(model, cache, prefill.last_logits, 6, eos=set(), keep_logits=True)
    assert out.tokens == live.sequences[0, ids.shape[-1] :].tolist()
    for mine, theirs in zip(out.logits, live.logits, strict=True):
        torch.testing.assert_close(mine, theirs[0], rtol=1e-5, atol=1e-5)
    assert cache.nbytes() == live_cache.nbytes()
    assert cache.stats()["tokens_kept"] == live_cache.stats()["tokens_kept"]


def test_one_prefill_serves_many_methods_untouched(model):
    """Building caches never alters the captured tensors (a second build gives the same logits)."""
    ids = _prompt(120, seed=2)
    prefill = capture_prefill(model, ids)
    before = [c.keys.clone() for c in prefill.layers]
    a = forward(model, build_cache(model, prefill, "snapkv", 0.5), torch.tensor([[5, 6, 7]]))
    build_cache(model, prefill, "h2o", 0.25)
    b = forward(model, build_cache(model, prefill, "snapkv", 0.5), torch.tensor([[5, 6, 7]]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for old, cap in zip(before, prefill.layers, strict=True):
        assert torch.equal(old, cap.keys)


def test_query_agnostic_matches_live_prefill(model):
    """Context compressed alone, then the question appended: same as CompressedCache.prefill + forward."""
    ctx, question = _prompt(140, seed=3), torch.tensor([[9, 10, 11, 12]])
    live = CompressedCache(model, "tova", ratio=0.5)
    live.prefill(model, ctx)
    expected = forward(model, live, question)
    cache = build_cache(model, capture_prefill(model, ctx), "tova", 0.5)
    torch.testing.assert_close(forward(model, cache, question), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["snapkv", "kivi"])
def test_captured_path_equals_live_on_sliding_window_layers(method):
    """Gemma-3 (sliding + global layers): sliding layers keep their window in both paths."""
    model = tiny_model("gemma3")
    ratio = 0.5 if parse_method(method).evicts else None
    ids = _prompt(120, seed=4)
    live_cache = CompressedCache(model, method, ratio=ratio)
    live_cache.expect(ids)
    with torch.no_grad():
        live = model.generate(
            ids, attention_mask=torch.ones_like(ids), past_key_values=live_cache, max_new_tokens=5,
            do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
    prefill = capture_prefill(model, ids)
    cache = build_cache(model, prefill, method, ratio)
    out = greedy(model, cache, prefill.last_logits, 5, eos=set(), keep_logits=True)
    assert out.tokens == live.sequences[0, ids.shape[-1] :].tolist()
    for mine, theirs in zip(out.logits, live.logits, strict=True):
        torch.testing.assert_close(mine, theirs[0], rtol=1e-5, atol=1e-5)
    assert cache.nbytes() == live_cache.nbytes()


def test_h2o_accumulated_attention_is_computed_once_per_prefill(model):
    """Every ratio of H2O reuses the prefill's accumulated attention, and still equals the live path."""
    import kvsqueeze.policies.h2o as h2o

    ids = _prompt(150, seed=5)
    prefill = capture_prefill(model, ids)
    calls = 0
    original = h2o.accumulated_attention

    def counting(ctx, *args, **kwargs):
        nonlocal calls
        calls += 1
        return original(ctx, *args, **kwargs)

    h2o.accumulated_attention = counting
    try:
        caches = {r: build_cache(model, prefill, "h2o", r) for r in (0.25, 0.5, 0.75)}
        assert calls == len(prefill.layers)  # once per layer, not once per layer and ratio
        for ratio, cache in caches.items():
            live = CompressedCache(model, "h2o", ratio=ratio)
            live.expect(ids)
            forward(model, live, ids, keep=1)  # the prompt, compressed during its forward pass
            expected = forward(model, live, torch.tensor([[7, 8, 9]]))
            torch.testing.assert_close(forward(model, cache, torch.tensor([[7, 8, 9]])), expected, rtol=1e-5,
                                       atol=1e-5)  # fmt: skip
            assert cache.nbytes() == live.nbytes()
        calls = 0  # a live pass never hits the memo (the cache holds none after being built)
        live = CompressedCache(model, "h2o", ratio=0.5)
        forward(model, live, ids)
        assert calls == len(prefill.layers) and "prefill_memo" not in caches[0.5].shared_state
    finally:
        h2o.accumulated_attention = original


def test_snapkv_votes_shared_across_ratios_and_budgets_equal_live(model):
    """SnapKV's window votes are computed once per prefill and reused by every ratio and budget allocator."""
    ids, question = _prompt(150, seed=6), torch.tensor([[4, 5, 6]])
    prefill = capture_prefill(model, ids)
    for method, ratio in [("snapkv", 0.25), ("snapkv+pyramidkv", 0.5), ("snapkv+adakv", 0.75), ("snapkv", 0.75)]:
        cache = build_cache(model, prefill, method, ratio)
        live = CompressedCache(model, method, ratio=ratio)
        forward(model, live, ids, keep=1)
        torch.testing.assert_close(forward(model, cache, question), forward(model, live, question), rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
        assert cache.stats()["tokens_kept"] == live.stats()["tokens_kept"]
    assert sorted({k[0] for k in prefill.memo}) == ["snapkv.votes:32"]
    assert len(prefill.memo) == len(prefill.layers)


@pytest.mark.parametrize("method", ["kvzip:chunk=64", "kvzip:chunk=64+kivi:bits=4"])
def test_whole_context_scorer_captured_equals_live_and_runs_its_pass_once(model, method, monkeypatch):
    """KVzip's reconstruction pass runs on the cache built from the capture exactly as on the live one; caches built
    from one prefill share one pass (every ratio reuses its scores)."""
    from kvsqueeze.policies import kvzip

    tok = CharTokenizer()
    ids = _prompt(150, seed=4)
    live = CompressedCache(model, method, ratio=0.5, tokenizer=tok)
    live.prefill(model, ids, attention_mask=torch.ones_like(ids))  # the capture's inputs: the same computation
    kept = live.stats()["tokens_kept"]
    question = torch.tensor([[9, 10, 11]])
    expected = forward(model, live, question)
    passes = []
    original = kvzip.reconstruction_pass
    monkeypatch.setattr(kvzip, "reconstruction_pass", lambda *a, **k: passes.append(1) or original(*a, **k))
    prefill = capture_prefill(model, ids)
    built = [build_cache(model, prefill, method, ratio, tok) for ratio in (0.5, 0.75)]
    assert len(passes) == 1
    assert built[0].stats()["tokens_kept"] == kept
    torch.testing.assert_close(forward(model, built[0], question), expected, rtol=0, atol=0)  # the same computation
