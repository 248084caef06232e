"""``kvsqueeze.store.open(url)``: a directory (atomic, concurrent, LRU under a size limit) and Redis (chunks,
metadata, TTL, size limit, concurrent processes) hold caches keyed by (model, method, tokens); prefix reuse loads the
longest stored prefix and prefills only the rest — with the same logits as computing it there."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import time

import pytest
import torch

from kvsqueeze import CompressedCache, KVSqueezeError, store
from kvsqueeze.store.prefix import reuse_prefix
from tests.conftest import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["directory", "redis"])
def url(request, tmp_path):
    if request.param == "directory":
        return str(tmp_path / "store")
    return request.getfixturevalue("redis_store_url")


def test_caches_round_trip_by_model_method_and_tokens(url):
    model = tiny_model("llama")
    kv = store.open(url)
    cache = CompressedCache(model, "snapkv:window=8+kivi", ratio=0.5)
    cache.prefill(model, ids(60))
    key = kv.save(cache, model)
    assert key == store.cache_key(model, "snapkv:window=8+kivi", ids(60)) and len(kv) == 1
    loaded = kv.load(key, model)
    with torch.no_grad():
        a = model(input_ids=ids(4, 1), past_key_values=cache.fork(), use_cache=True).logits
        b = model(input_ids=ids(4, 1), past_key_values=loaded.fork(), use_cache=True).logits
    assert torch.equal(a, b) and loaded.nbytes() == cache.nbytes()
    assert kv.load(store.cache_key(model, "snapkv:window=8+kivi", ids(61)), model) is None  # other tokens
    assert store.cache_key(model, "snapkv", ids(60)) != key  # another method
    assert store.cache_key(tiny_model("qwen2"), "snapkv:window=8+kivi", ids(60)) != key  # another model


def test_prefix_reuse_prefills_only_the_rest_with_the_same_logits(url):
    """The second request finds the stored (compressed) prefix: generate prefills only its question, and the
    answer's logits equal those of compressing the prefix there and then."""
    model = tiny_model("llama")
    kv = store.open(url)
    context, question = ids(64, 2), ids(6, 3)
    prompt = torch.cat([context, question], dim=-1)
    _, reused = reuse_prefix(kv, model, "snapkv:window=8", prompt, prefix_length=64, ratio=0.5)
    assert reused == 0 and len(kv) == 1
    second, reused = reuse_prefix(kv, model, "snapkv:window=8", torch.cat([context, ids(5, 4)], -1))
    assert reused == 64 and second.get_seq_length() == 64
    fresh = CompressedCache(model, "snapkv:window=8", ratio=0.5)
    fresh.prefill(model, context)
    prompt2 = torch.cat([context, ids(5, 4)], -1)
    with torch.no_grad():
        got = model.generate(prompt2, past_key_values=second, max_new_tokens=4, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)  # fmt: skip
        want = model.generate(prompt2, past_key_values=fresh.fork(), max_new_tokens=4, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits, strict=True))
    none, reused = reuse_prefix(kv, model, "snapkv:window=8", ids(30, 9))
    assert reused == 0 and none.get_seq_length() == 0  # nothing stored for it: an empty cache


def test_directory_store_evicts_the_least_recently_used(tmp_path):
    model = tiny_model("llama")
    caches = []
    for seed in range(3):
        c = CompressedCache(model, "none")
        c.prefill(model, ids(40, seed))
        caches.append(c)
    size = len(__import__("kvsqueeze").core.persist.to_bytes(caches[0]))
    kv = store.open(tmp_path / "s", max_bytes=int(2.5 * size))
    k0, k1 = kv.save(caches[0], model), kv.save(caches[1], model)
    time.sleep(0.02)
    assert kv.load(k0, model) is not None  # k0 used last: k1 is the least recently used
    k2 = kv.save(caches[2], model)
    assert kv.load(k1, model) is None and kv.load(k0, model) is not None and kv.load(k2, model) is not None
    assert kv.nbytes() <= 2.5 * size and not list((tmp_path / "s").rglob(".*.tmp"))


def test_redis_store_expires_and_bounds_its_size(redis_store_url):
    model = tiny_model("llama")
    c = CompressedCache(model, "none")
    c.prefill(model, ids(40))
    kv = store.open(redis_store_url, ttl=1)
    key = kv.save(c, model)
    assert kv.load(key, model) is not None
    time.sleep(2.1)
    assert kv.load(key, model) is None and kv.nbytes() == 0  # expired, and no longer counted
    small = store.open(redis_store_url, max_bytes=10)
    with pytest.raises(KVSqueezeError, match="does not fit"):
        small.save(c, model)


def test_bad_stores_and_corrupt_entries_are_one_line(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(KVSqueezeError, match="unknown store URL"):
        store.open("s3://bucket/x")
    with pytest.raises(KVSqueezeError, match="cannot reach the Redis store"):
        store.open("redis://127.0.0.1:1/0")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(KVSqueezeError, match="cannot use"):
        store.open(tmp_path / "afile" / "sub")
    kv = store.open(tmp_path / "s")
    c = CompressedCache(model, "none")
    c.prefill(model, ids(30))
    key = kv.save(c, model)
    path = kv.backend.path(key)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(KVSqueezeError, match="truncated or corrupt"):
        kv.load(key, model)
    with pytest.raises(KVSqueezeError, match="does not know its tokens"):
        kv.save(CompressedCache(model, "none"), model)
    with pytest.raises(KVSqueezeError, match="model must be a loaded transformers causal LM"):
        kv.save(c, None)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:99999/0", "bad Redis store URL 'redis://127.0.0.1:99999/0' (Port out of range"),
        ("redis://127.0.0.1:port/0", "bad Redis store URL 'redis://127.0.0.1:port/0' (Port could not be cast"),
        ("redis://127.0.0.1:1/0", "start redis-server there or fix the URL"),
    ],
)
def test_a_redis_url_with_a_bad_port_is_one_line(url, message):
    pytest.importorskip("redis")
    with pytest.raises(KVSqueezeError, match=re.escape(message)) as err:
        store.open(url)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://kv:s3cret@127.0.0.1:1/0", "redis://kv:***@127.0.0.1:1/0"),
        ("redis://:s3cret@127.0.0.1:99999/0", "redis://***/0"),  # a bad port: only the scheme and the path
    ],
)
def test_redis_messages_never_show_the_password(url, shown):
    pytest.importorskip("redis")
    with pytest.raises(KVSqueezeError) as err:
        store.open(url)
    assert shown in str(err.value) and "s3cret" not in str(err.value)


@pytest.mark.parametrize("under", ["", "sub"])
def test_a_directory_store_at_a_file_names_that_file(tmp_path, under):
    taken = tmp_path / "taken"
    taken.write_text("x")
    with pytest.raises(
        KVSqueezeError, match=re.escape(f"({taken} is a file, not a folder); give a writable directory")
    ):
        store.open(taken / under if under else taken)


def _hammer(url: str, worker: int, rounds: int, sizes: tuple[int, int], failures) -> None:
    """Random puts and gets of blobs whose content names their checksum: a get returns a whole blob or none."""
    kv = store.open(url)
    rng = torch.Generator().manual_seed(worker)
    for _ in range(rounds):
        key = f"k{int(torch.randint(0, 8, (1,), generator=rng))}"
        if int(torch.randint(0, 2, (1,), generator=rng)):
            n = int(torch.randint(sizes[0], sizes[1], (1,), generator=rng))
            body = os.urandom(n)
            kv.backend.put(key, hashlib.sha256(body).digest() + body)
        else:
            blob = kv.backend.get(key)
            if blob is not None and hashlib.sha256(blob[32:]).digest() != blob[:32]:
                failures.put(key)


def test_two_processes_writing_and_reading_the_same_keys_lose_nothing(url):
    failures = multiprocessing.get_context("spawn").Queue()
    procs = [multiprocessing.get_context("spawn").Process(target=_hammer, args=(url, w, 60, (1000, 300_000), failures))
             for w in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert failures.empty()
    kv = store.open(url)
    for key in kv.backend.entries():
        blob = kv.backend.get(key)
        assert hashlib.sha256(blob[32:]).digest() == blob[:32]
