"""``cache.save(path)`` / ``CompressedCache.load(path, model)``: bit-exact for every registered method (storages,
bytes, and the logits of whatever comes next), also in the middle of a decoding schedule; another model, dtype,
component version, a truncated or foreign file are refused in one line."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvsqueeze import CompressedCache, KVSqueezeError
from kvsqueeze.codecs.kivi import KIVICodec
from tests.bench.conftest import CharTokenizer
from tests.conftest import tiny_model
from tests.core import test_bytes_are_storage as storage_tests
from tests.core.test_bytes_are_storage import ids, ratio_for

specs = storage_tests.specs  # the fixture: a runnable spec for every registered component

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def storages(cache: CompressedCache) -> list[torch.Tensor]:
    return [t for obj in cache.held_objects() for t in _tensors(obj)]


def _tensors(obj):
    from kvsqueeze.core.storage import walk_tensors

    return list(walk_tensors(obj))


def next_logits(lm, cache: CompressedCache, seed: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return lm(input_ids=ids(5, seed=seed), past_key_values=cache.fork(), use_cache=True).logits


def test_every_method_round_trips_bit_for_bit(model, specs, tmp_path):
    failures = []
    for spec in specs:
        if "hf_" in spec:
            continue  # transformers' backend objects: refused below
        cache = CompressedCache(model, spec, ratio=ratio_for(spec), tokenizer=CharTokenizer())
        cache.prefill(model, ids(100, seed=1))
        path = cache.save(tmp_path / "c.safetensors")
        loaded = CompressedCache.load(path, model, tokenizer=CharTokenizer())
        assert len(storages(cache)) == len(storages(loaded)), spec
        same = [torch.equal(a, b) and a.dtype == b.dtype and a.device == b.device
                for a, b in zip(storages(cache), storages(loaded), strict=True)]  # fmt: skip
        if not all(same) or loaded.nbytes() != cache.nbytes() or loaded.stats() != cache.stats():
            failures.append(f"{spec}: state differs")
        elif not torch.equal(next_logits(model, cache), next_logits(model, loaded)):
            failures.append(f"{spec}: logits differ")
    assert not failures, failures


@pytest.mark.parametrize("spec", ["h2o+interval:every=4,budget=48", "lazyeviction:budget=48,window=8", "snapkv+kivi"])
def test_saved_in_the_middle_of_decoding_continues_identically(spec, tmp_path):
    """Generate, save, keep generating from the saved copy and from the live cache: the same tokens and logits."""
    lm = tiny_model("llama")
    cache = CompressedCache(lm, spec, ratio=ratio_for(spec))
    prompt = ids(80, seed=3)
    with torch.no_grad():
        first = lm.generate(prompt, past_key_values=cache, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        path = cache.save(tmp_path / "mid.safetensors")
        loaded = CompressedCache.load(path, lm)
        steps = [(cache, []), (loaded, [])]
        for c, out in steps:
            token = first[:, -1:]
            for _ in range(12):
                logits = lm(input_ids=token, past_key_values=c, use_cache=True).logits[:, -1]
                out.append(logits)
                token = logits.argmax(-1, keepdim=True)
    assert all(torch.equal(a, b) for a, b in zip(steps[0][1], steps[1][1], strict=True))


def test_what_cannot_be_loaded_is_refused_in_one_line(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    cache = CompressedCache(lm, "snapkv:window=8+kivi", ratio=0.5)
    cache.prefill(lm, ids(60))
    path = cache.save(tmp_path / "c.safetensors")
    with pytest.raises(KVSqueezeError, match="another model"):
        CompressedCache.load(path, tiny_model("qwen2"))
    with pytest.raises(KVSqueezeError, match="holds float32 tensors but the model runs in bfloat16"):
        CompressedCache.load(path, tiny_model("llama").to(torch.bfloat16))
    monkeypatch.setattr(KIVICodec, "version", 2)
    with pytest.raises(KVSqueezeError, match="other versions"):
        CompressedCache.load(path, lm)
    monkeypatch.undo()
    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(KVSqueezeError, match="truncated or corrupt"):
        CompressedCache.load(tmp_path / "short.safetensors", lm)
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(KVSqueezeError, match="not a kvsqueeze cache file"):
        CompressedCache.load(tmp_path / "text.safetensors", lm)
    with pytest.raises(KVSqueezeError, match="no saved cache"):
        CompressedCache.load(tmp_path / "missing.safetensors", lm)
    with pytest.raises(KVSqueezeError, match="is a directory"):
        cache.save(tmp_path)
    with pytest.raises(KVSqueezeError, match="model must be a loaded transformers causal LM, got NoneType"):
        CompressedCache.load(path, None)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave nothing behind


@pytest.mark.parametrize("under", ["c.safetensors", "sub/c.safetensors"])
def test_saving_under_a_file_names_that_file(tmp_path, under):
    lm = tiny_model("llama")
    cache = CompressedCache(lm, "none")
    cache.prefill(lm, ids(10))
    taken = tmp_path / "taken"
    taken.write_text("x")
    with pytest.raises(KVSqueezeError, match=f"{taken} is a file, not a folder\\); give a writable path") as err:
        cache.save(taken / under)  # the OS says only "File exists" / "Not a directory"
    assert "\n" not in str(err.value)


def test_backend_quantized_blocks_are_refused_at_save(tmp_path):
    pytest.importorskip("optimum.quanto")
    lm = tiny_model("llama")
    cache = CompressedCache(lm, "hf_quanto")
    cache.prefill(lm, ids(60))
    with pytest.raises(KVSqueezeError, match="cannot save"):
        cache.save(tmp_path / "q.safetensors")
    assert not (tmp_path / "q.safetensors").exists()


def test_a_full_cache_saved_continues_like_dynamic_cache(tmp_path):
    lm = tiny_model("llama")
    prompt = ids(50, seed=4)
    cache = CompressedCache(lm, "none")
    cache.prefill(lm, prompt)
    loaded = CompressedCache.load(cache.save(tmp_path / "n.safetensors"), lm)
    reference = DynamicCache(config=lm.config)
    with torch.no_grad():
        lm(input_ids=prompt, past_key_values=reference, use_cache=True)
        want = lm(input_ids=ids(4, seed=5), past_key_values=reference, use_cache=True).logits
        got = lm(input_ids=ids(4, seed=5), past_key_values=loaded, use_cache=True).logits
    assert torch.equal(got, want)
