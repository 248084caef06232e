"""Every codec through ``model.generate`` on a tiny random model, alone and after eviction; KIVI-4 on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import CompressedCache
from kvsqueeze.core.layer import CompressedLayer
from tests.conftest import tiny_model

CODECS = [
    "int:bits=8",
    "int:bits=3,per=channel,group=8",
    "kivi:bits=2,group=8,residual=8",
    "fp8",
    "fp8:format=e5m2",
    "qjl:sketch=64",
    "gear:bits=2,group=16,rank=2",
    "rotatekv:group=8,sinks=2",
    "bfp:bits=4,block=8,group=8",
    "mikv:group=8",
    "zipcache:group=8",
]
NEAR_LOSSLESS = ["int:bits=8", "kivi:bits=8,group=8,residual=8", "fp8", "qjl:sketch=2048,value_bits=8"]


def _ids(n=48, batch=2, seed=0):
    return torch.randint(1, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _generate(model, spec, ids, **kw):
    cache = CompressedCache(model, spec, **kw)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=cache, pad_token_id=0)
    return out, cache


def _held(cache):
    return [layer for layer in cache.layers if isinstance(layer, CompressedLayer)]


@pytest.mark.parametrize("spec", CODECS)
@pytest.mark.parametrize("evict", ["", "snapkv:window=8+"])
def test_codec_generates_with_packed_storage(llama, spec, evict):
    ids = _ids()
    out, cache = _generate(llama, evict + spec, ids, ratio=0.5 if evict else None)
    assert out.shape == (2, 48 + 24)
    assert cache.nbytes() < cache.full_nbytes() / (2 if "8" not in spec.split(",")[0] else 1.4)
    for layer in _held(cache):
        assert layer.blocks, "context must be held in encoded blocks"
        # Decode-time flushes merge into the existing block (no pile-up), except gear's per-chunk factors.
        assert len(layer.blocks) == 1 or spec.startswith("gear")
        kept = layer.kept_lengths()
        assert int(kept.max()) <= 48 + 24 and layer.seen == 48 + 23
        assert layer.nbytes() == layer.keys.numel() * 8 + sum(b.nbytes() for b in layer.blocks)


@pytest.mark.parametrize("spec", NEAR_LOSSLESS)
def test_high_precision_codecs_keep_the_greedy_continuation(llama, spec):
    ids = _ids(seed=3)
    ref, _ = _generate(llama, "none", ids)
    out, _ = _generate(llama, spec, ids)
    assert (out == ref).float().mean() > 0.95


def test_low_bits_change_logits_more_than_high_bits(llama):
    ids = _ids(64, batch=1, seed=4)
    with torch.no_grad():
        ref = llama(ids).logits[:, -1]
    errs = {}
    for spec in ["int:bits=2", "int:bits=4", "int:bits=8"]:
        cache = CompressedCache(llama, spec)
        with torch.no_grad():
            llama(ids[:, :-1], past_key_values=cache)
            logits = llama(ids[:, -1:], past_key_values=cache).logits[:, -1]
        errs[spec] = float((logits - ref).abs().max())
    assert errs["int:bits=8"] < errs["int:bits=4"] < errs["int:bits=2"]


def test_gemma3_global_layers_quantized_and_sliding_layers_bounded_by_the_window():
    model = tiny_model("gemma3")  # window 8 on layers 0 and 2
    out, cache = _generate(model, "kivi:bits=4,group=8,residual=4", _ids(40, batch=1))
    assert out.shape[-1] == 64
    assert all(layer.blocks for layer in _held(cache) if not layer.is_sliding)
    for layer in _held(cache):
        if layer.is_sliding:  # blocks that left the window are dropped: window + one flush group + the residual
            assert int(layer.kept_lengths().max()) <= 8 + 8 + 4
            assert all(int(b.positions.max()) > layer.seen - 1 - 8 for b in layer.blocks)


@pytest.mark.model
def test_kivi4_keeps_full_cache_greedy_answer_on_a_needle(smollm2):
    from kvsqueeze.data import haystack, insert_needle
    from kvsqueeze.pipeline import answer

    model, tok = smollm2
    needle = "The secret code of the blue door is 4172."
    context = insert_needle(haystack(tok, 600), needle, 0.4)
    question = "What is the secret code of the blue door? Answer with the number only."
    full = answer(model, tok, "none", context, question, max_new_tokens=14)
    kivi = answer(model, tok, "kivi:bits=4", context, question, max_new_tokens=14)
    assert "4172" in full.text
    # Same greedy answer; at 4 bits KIVI may append a trailing period where the full cache stops (EOS).
    assert kivi.text.rstrip(".") == full.text.rstrip(".")
    assert kivi.cache_bytes < full.cache_bytes / 2.5
