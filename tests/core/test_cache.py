"""CompressedCache behaviour: real storage, unshifted positions, padding, per-row budgets, forks, sliding layers."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvsqueeze import CompressedCache, KVSqueezeError
from kvsqueeze.core.layer import CompressedLayer
from tests.conftest import tiny_model


def ids_of(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def forward(model, ids, cache, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits


def test_evicted_tokens_are_gone_from_memory(llama):
    cache = CompressedCache(llama, "knorm", ratio=0.5)
    forward(llama, ids_of(64), cache)
    for layer in cache.layers:
        assert layer.keys.shape == (1, 2, 32, 16)  # physically 32 of 64 tokens per head
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert cache.nbytes() == held
    assert cache.nbytes() * 2 == cache.full_nbytes()
    assert cache.get_seq_length() == 64  # transformers sees the logical length


def test_kept_tokens_are_the_top_k_of_the_score_end_to_end(llama):
    ids = ids_of(50)
    full = DynamicCache(config=llama.config)
    forward(llama, ids, full)
    cache = CompressedCache(llama, "knorm", budget=20)
    forward(llama, ids, cache)
    for idx, layer in enumerate(cache.layers):
        keys = full.layers[idx].keys
        expect = torch.topk(-keys.norm(dim=-1), 20, dim=-1).indices.sort(-1).values
        assert torch.equal(layer.keys, torch.gather(keys, 2, expect[..., None].expand(-1, -1, -1, keys.shape[-1])))


def test_positions_never_shift_after_eviction(llama):
    """Decoding over a StreamingLLM cache equals the full model with evicted tokens masked out (same RoPE)."""
    ids = ids_of(60, seed=3)
    prompt, follow = ids[:, :40], ids[:, 40:]
    cache = CompressedCache(llama, "streaming_llm:sinks=4", budget=16)
    forward(llama, prompt, cache)
    got = torch.cat([forward(llama, follow[:, i : i + 1], cache) for i in range(follow.shape[1])], dim=1)
    keep = torch.zeros(60, dtype=torch.bool)
    keep[:4] = True
    keep[28:] = True  # last 12 prompt tokens + every generated token
    mask = torch.tril(torch.ones(60, 60, dtype=torch.bool))
    mask[40:, :40] &= keep[:40]
    with torch.no_grad():
        llama.set_attn_implementation("sdpa")
        ref = llama(input_ids=ids, attention_mask=mask[None, None]).logits[:, 40:]
    assert torch.allclose(got, ref, atol=1e-5)


def test_multi_token_block_after_ragged_compression_matches_token_by_token(llama):
    ids = ids_of(70, batch=2, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    cache = CompressedCache(llama, "snapkv:window=8", ratio=0.6)
    forward(llama, ids[:, :50], cache, mask[:, :50])
    assert any(layer.blocks for layer in cache.layers)  # rows differ in length: ragged storage
    one = cache.fork()
    block = forward(llama, ids[:, 50:], one, mask)
    step = cache.fork()
    singles = [forward(llama, ids[:, i : i + 1], step, mask[:, : i + 1]) for i in range(50, 70)]
    assert torch.allclose(block, torch.cat(singles, dim=1), atol=1e-5)


def test_padding_never_kept_and_each_row_gets_its_own_budget(llama):
    ids = ids_of(40, batch=2, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    cache = CompressedCache(llama, "knorm", ratio=0.5)
    batched = forward(llama, ids, cache, mask)
    for layer in cache.layers:
        assert layer.kept_lengths().tolist() == [[20, 20], [15, 15]]
    single = CompressedCache(llama, "knorm", ratio=0.5)
    alone = forward(llama, ids[1:, 10:], single)
    step_ids = ids_of(1, batch=2, seed=6)
    nxt = forward(llama, step_ids, cache, torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1))
    nxt_alone = forward(llama, step_ids[1:], single)
    assert torch.allclose(batched[1, -1], alone[0, -1], atol=1e-5)
    assert torch.allclose(nxt[1], nxt_alone[0], atol=1e-5)


def test_answering_from_a_fork_leaves_the_compressed_context_unchanged(llama):
    context, q1, q2 = ids_of(48, seed=7), ids_of(6, seed=8), ids_of(6, seed=9)
    cache = CompressedCache(llama, "snapkv:window=8", ratio=0.5)
    forward(llama, context, cache)
    before = [(layer.keys.clone(), layer.values.clone(), layer.seen) for layer in cache.layers]
    first = forward(llama, q1, cache.fork())
    for layer, (k, v, seen) in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v) and layer.seen == seen
    fresh = CompressedCache(llama, "snapkv:window=8", ratio=0.5)
    forward(llama, context, fresh)
    assert torch.equal(forward(llama, q2, cache.fork()), forward(llama, q2, fresh))
    assert torch.equal(forward(llama, q1, cache.fork()), first)


def test_query_aware_and_agnostic_compress_different_windows(llama):
    context, question = ids_of(48, seed=10), ids_of(8, seed=11)
    agnostic = CompressedCache(llama, "snapkv:window=4", budget=12)
    forward(llama, context, agnostic)
    aware = CompressedCache(llama, "snapkv:window=4", budget=12)
    forward(llama, torch.cat([context, question], 1), aware)
    assert agnostic.layers[0].keys.shape[2] == 12 and aware.layers[0].keys.shape[2] == 12
    assert agnostic.get_seq_length() == 48 and aware.get_seq_length() == 56


def test_gemma3_compresses_global_and_sliding_layers_within_the_window():
    model = tiny_model("gemma3")  # sliding window 8 on layers 0 and 2
    cache = CompressedCache(model, "knorm", ratio=0.5)
    with torch.no_grad():
        model.generate(ids_of(40), max_new_tokens=4, past_key_values=cache, do_sample=False, pad_token_id=0)
    assert all(isinstance(layer, CompressedLayer) for layer in cache.layers)
    assert [layer.is_sliding for layer in cache.layers] == [True, False, True, False]
    assert cache.layers[1].kept_lengths().tolist() == [[20 + 3]]
    # the window's 7 visible prompt tokens, halved, then 3 decoded tokens: never more than the window holds
    assert cache.layers[0].kept_lengths().tolist() == [[4 + 3]]
    assert int(cache.layers[0].front_cols.min()) > 40 - 8


def test_method_none_keeps_transformers_sliding_window_layers():
    model = tiny_model("gemma3")
    cache = CompressedCache(model, "none")
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [DynamicSlidingWindowLayer, CompressedLayer, DynamicSlidingWindowLayer, CompressedLayer]


def test_generate_with_every_eviction_method(llama):
    for spec in ["random", "streaming_llm", "h2o", "snapkv:window=8", "tova", "knorm", "keydiff"]:
        cache = CompressedCache(llama, spec, ratio=0.5)
        with torch.no_grad():
            out = llama.generate(ids_of(40), max_new_tokens=5, min_new_tokens=5, past_key_values=cache,
                                 do_sample=False, pad_token_id=0)  # fmt: skip
        assert out.shape == (1, 45)
        assert cache.stats()["tokens_kept_mean"] == 20 + 4


def test_ratio_zero_keeps_everything_and_matches_the_full_cache_exactly(llama):
    ids = ids_of(30, seed=12)
    ref = DynamicCache(config=llama.config)
    cache = CompressedCache(llama, "snapkv:window=8", ratio=0.0)
    forward(llama, ids, ref)
    forward(llama, ids, cache)
    nxt = ids_of(1, seed=13)
    assert torch.equal(forward(llama, nxt, ref), forward(llama, nxt, cache))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "snapkv", "ratio": 1.0}, "ratio must be"),
        ({"method": "snapkv", "ratio": -0.1}, "ratio must be"),
        ({"method": "snapkv", "budget": 0}, "budget must be"),
        ({"method": "snapkv", "ratio": 0.5, "budget": 3}, "either a ratio or a budget"),
        ({"method": "nope"}, "unknown method component 'nope'"),
        ({"method": None}, "method must be a spec string such as 'snapkv'"),
    ],
)
def test_bad_arguments_fail_at_construction(llama, kwargs, message):
    with pytest.raises(KVSqueezeError, match=message):
        CompressedCache(llama, **kwargs)


@pytest.mark.parametrize("model", [None, "HuggingFaceTB/SmolLM2-135M", "config"])
def test_something_that_is_not_a_model_is_refused_at_construction(llama, model):
    model = llama.config if model == "config" else model  # AttributeError: 'NoneType' ... 'config' before
    with pytest.raises(KVSqueezeError, match="model must be a loaded transformers causal LM"):
        CompressedCache(model, "snapkv", ratio=0.5)


def test_budget_smaller_than_protected_window_is_a_clear_error(llama):
    cache = CompressedCache(llama, "snapkv:window=32", budget=8)
    with pytest.raises(KVSqueezeError, match="always keeps 32 tokens"):
        forward(llama, ids_of(64), cache)


def test_unsupported_architecture_fails_at_construction(llama):
    class Legacy(LlamaForCausalLM):
        _supports_attention_backend = False

    model = Legacy(llama.config)
    with pytest.raises(KVSqueezeError, match="unsupported architecture Legacy"):
        CompressedCache(model, "snapkv")
