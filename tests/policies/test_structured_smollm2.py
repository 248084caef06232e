"""windowkv, treekv and dapq on the embedded SmolLM2: generate works, every head keeps its exact budget, the bytes
held are the kept tokens × bytes per token; treekv also as a decoding schedule."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import CompressedCache


@pytest.mark.model
def test_structured_selectors_on_smollm2(smollm2):
    model, tokenizer = smollm2
    from kvsqueeze.data import haystack

    ids = tokenizer(haystack(tokenizer, 300), return_tensors="pt").input_ids[:, :300]
    config = model.config
    per_token = 2 * config.head_dim * 4  # keys + values, fp32
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    for method in ["windowkv", "windowkv:task=localization", "treekv", "dapq:offset=16"]:
        cache = CompressedCache(model, method, ratio=0.6)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=2, do_sample=False)
        assert out.shape == (1, 302), method
        lengths = torch.stack([layer.kept_lengths()[0] for layer in cache.layers])  # [layers, H]
        assert lengths.shape == (layers, heads) and bool((lengths == 120 + 1).all()), method  # 120 kept + 1 decoded
        payload = int(lengths.sum()) * per_token  # kept keys and values; the rest: [B, H] lengths, calibration profiles
        assert payload <= cache.nbytes() <= payload * 1.005, method
    cache = CompressedCache(model, "treekv+interval:every=8,budget=64")
    out = model.generate(ids, past_key_values=cache, max_new_tokens=12, do_sample=False)
    assert out.shape == (1, 312)
    assert all(int(layer.kept_lengths().max()) < 64 + 8 for layer in cache.layers)
    payload = sum(int(layer.kept_lengths().sum()) for layer in cache.layers) * per_token
    queries = layers * config.num_attention_heads * 32 * config.head_dim * 4  # the schedule's 32-query window
    assert payload + queries <= cache.nbytes() <= (payload + queries) * 1.02  # + positions, validity
