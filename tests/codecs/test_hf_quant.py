"""transformers' quantized-cache backends as codecs: same logits and same bytes as ``QuantizedCache`` itself."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers.cache_utils import QuantizedCache

from kvsqueeze import CompressedCache
from kvsqueeze.core.storage import storage_bytes
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import parse_method
from tests.conftest import tiny_model

BACKENDS = [
    pytest.param("quanto", "hf_quanto:bits=2", {"nbits": 2}, "optimum.quanto", id="quanto-2"),
    pytest.param("quanto", "hf-quanto:bits=4", {"nbits": 4}, "optimum.quanto", id="quanto-4"),
    pytest.param("hqq", "hf_hqq:bits=2", {"nbits": 2}, "hqq", id="hqq-2"),
    pytest.param("hqq", "hf_hqq:bits=3", {"nbits": 3}, "hqq", id="hqq-3"),
    pytest.param("fp8", "hf_fp8", {}, None, id="fp8"),
]


def _skip_without(module: str | None) -> None:
    if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
        pytest.skip(f"{module} not installed (pip install 'kvsqueeze[hf-quant]')")
    if module == "optimum.quanto" and importlib.util.find_spec("optimum.quanto") is None:
        pytest.skip("optimum-quanto not installed")


@pytest.mark.parametrize(("backend", "spec", "kwargs", "module"), BACKENDS)
def test_same_logits_and_bytes_as_transformers_quantized_cache(backend, spec, kwargs, module):
    _skip_without(module)
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    ref, ours = QuantizedCache(backend, model.config, **kwargs), CompressedCache(model, spec)
    with torch.no_grad():
        for chunk in [ids[:, :40], *ids[:, 40:].split(1, dim=1)]:  # prefill, then 20 decode steps
            a = model(chunk, past_key_values=ref).logits
            b = model(chunk, past_key_values=ours).logits
            assert torch.allclose(a, b, atol=1e-5)
    theirs = storage_bytes([[x._quantized_keys, x._quantized_values, x.keys, x.values] for x in ref.layers])
    lengths = sum(8 * b.lengths.numel() for layer in ours.layers for b in layer.blocks)  # our [B, H] bookkeeping
    assert ours.nbytes() == theirs + lengths  # byte for byte what transformers holds
    assert ours.nbytes() < ours.full_nbytes() / (1.5 if backend == "fp8" else 2)


@pytest.mark.parametrize("spec", ["hf_quanto:bits=2,group=8", "hf_hqq:bits=4,group=8", "snapkv:window=8+hf_fp8"])
def test_generates_with_residual_flushes_and_after_eviction(spec):
    _skip_without({"hf_quanto": "optimum.quanto", "hf_hqq": "hqq"}.get(spec.split(":")[0]))
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    cache = CompressedCache(model, spec, ratio=0.5 if "snapkv" in spec else None)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False, past_key_values=cache, pad_token_id=0)
    assert out.shape == (2, 52)
    layer = cache.layers[0]
    assert len(layer.blocks) == 1
    kept = (16 if "snapkv" in spec else 32) + 19
    assert int(layer.kept_lengths().max()) == kept
    if "group=8" in spec:  # 19 decoded tokens: two flushes of 8 re-quantized into the block, 3 still exact
        assert layer.keys.shape[-2] == 3 and int(layer.blocks[0].lengths[0, 0]) == kept - 3


def test_bad_parameters_and_ragged_heads_name_the_fix():
    with pytest.raises(KVSqueezeError, match="must be one of 2, 4"):
        parse_method("hf_quanto:bits=3")
    model = tiny_model("llama")
    cache = CompressedCache(model, "snapkv:window=4+adakv+hf_fp8", ratio=0.6)
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    with pytest.raises(KVSqueezeError, match="uniform budget"):
        cache.prefill(model, ids)
