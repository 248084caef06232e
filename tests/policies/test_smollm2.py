"""The budget / head-selection methods on the embedded SmolLM2: generate works, the totals are exact and the
bytes held are Σ per-head tokens × bytes per token (ragged storage is real)."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import CompressedCache


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    from kvsqueeze.calibration.heads import calibrate_heads

    return str(calibrate_heads(None, tmp_path_factory.mktemp("heads") / "smollm2.json"))


@pytest.mark.model
def test_methods_on_smollm2(smollm2, calibration):
    model, tokenizer = smollm2
    from kvsqueeze.data import haystack

    ids = tokenizer(haystack(tokenizer, 300), return_tensors="pt").input_ids[:, :300]
    methods = [
        "snapkv+adakv",
        "snapkv+pyramidkv",
        f"snapkv+prefixkv:profile={calibration}",
        f"razorattention:heads={calibration}",
        "cake",
        "defensivekv",
        "layer_defensivekv",
        "chunkkv",
        f"compresskv:heads={calibration}",
        "kvcrush",
    ]
    config = model.config
    per_token = 2 * config.head_dim * 4  # keys + values, fp32
    for method in methods:
        cache = CompressedCache(model, method, ratio=0.6)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=2, do_sample=False)
        assert out.shape == (1, 302), method
        lengths = torch.stack([layer.kept_lengths()[0] for layer in cache.layers])  # [layers, H]
        held_context = int(lengths.sum()) - config.num_hidden_layers * config.num_key_value_heads  # 1 decoded
        assert held_context == config.num_hidden_layers * config.num_key_value_heads * 120, method
        payload = int(lengths.sum()) * per_token  # kept keys and values; the rest: [B, H] lengths, calibration profiles
        assert payload <= cache.nbytes() <= payload * 1.005, method
