"""KVTuner: the Pareto search gives sensitive layers more bits; the codec applies each layer's pair."""

from __future__ import annotations

import json

import pytest
import torch

from kvsqueeze import CompressedCache, KVSqueezeError
from kvsqueeze.calibration.kvtuner import CANDIDATES, pareto_front, search
from kvsqueeze.calibration.store import cache_path, cached
from kvsqueeze.codecs import kvtuner
from kvsqueeze.core.layer import CompressedLayer
from kvsqueeze.spec import parse_method


def test_pareto_front_is_non_dominated_and_spends_bits_on_sensitive_layers():
    bits = [(k + v) / 2 for k, v in CANDIDATES]  # 8, 6, 4, 3, 2
    robust = [0.0, 0.0, 0.001, 0.002, 0.004]
    sensitive = [0.0, 0.01, 0.1, 1.0, 5.0]
    errors = [robust, sensitive, robust, robust]
    front = pareto_front(errors, bits, [[0], [1], [2], [3]])
    for a in front:
        for b in front:
            assert not (b["mean_bits"] <= a["mean_bits"] and b["error"] < a["error"] and b is not a)
    best_at_4 = min((p for p in front if p["mean_bits"] <= 4.0), key=lambda p: p["error"])
    pairs = best_at_4["pairs"]
    assert bits[pairs[1]] > max(bits[pairs[0]], bits[pairs[2]], bits[pairs[3]])  # sensitive layer gets more
    # Exhaustive check on this small problem: nothing within 4 mean bits beats the chosen error.
    import itertools

    best = min(
        sum(errors[layer][p] for layer, p in enumerate(c))
        for c in itertools.product(range(5), repeat=4)
        if sum(bits[p] for p in c) / 4 <= 4.0
    )
    assert best_at_4["error"] <= best + 1e-12


def test_search_writes_a_config_the_codec_applies(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path / "cache"))
    calls = []

    def compute():
        calls.append(1)
        return search(llama, None, n_tokens=48, probe=8, group=8, target=3.0)

    config = cached(llama, "kvtuner", {"t": 1}, compute)
    again = cached(llama, "kvtuner", {"t": 1}, compute)
    assert config == again and len(calls) == 1 and cache_path(llama, "kvtuner", {"t": 1}).is_file()
    assert config["mean_bits"] <= 3.0 and set(config["layers"]) == {"0", "1"}
    path = tmp_path / "kvtuner.json"
    path.write_text(json.dumps({**config, "layers": {"0": [4, 4], "1": [4, 4]}}))
    assert kvtuner.load_config(str(path)) == {0: (4, 4), 1: (4, 4)}
    # Force distinct pairs per layer to see them applied: the edited file is read again.
    config["layers"] = {"0": [8, 4], "1": [2, 2]}
    path.write_text(json.dumps(config) + " ")
    assert kvtuner.load_config(str(path)) == {0: (8, 4), 1: (2, 2)}
    cache = CompressedCache(llama, f"kvtuner:config={path},group=8,residual=8")
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    out = llama.generate(ids, max_new_tokens=20, do_sample=False, past_key_values=cache, pad_token_id=0)
    assert out.shape[-1] == 60
    layers = [layer for layer in cache.layers if isinstance(layer, CompressedLayer)]
    assert [(b.keys.bits, b.values.bits) for b in (layer.blocks[0] for layer in layers)] == [(8, 4), (2, 2)]
    assert all(len(layer.blocks) == 1 for layer in layers)  # decode flushes merged at the layer's bits
    assert int(layers[0].blocks[0].lengths.sum()) == 2 * 48  # 32 prefill + 16 flushed tokens per head


def test_missing_or_foreign_config_is_a_clear_error(llama, tmp_path):
    with pytest.raises(KVSqueezeError, match="calibrate kvtuner"):
        CompressedCache(llama, f"kvtuner:config={tmp_path / 'none.json'}").prefill(llama, torch.ones(1, 40).long())
    codec = parse_method("kvtuner").codec
    with pytest.raises(KVSqueezeError, match="config"):
        codec.encode(torch.zeros(4, 16), torch.zeros(4, 16), torch.tensor([[4]]), object())
