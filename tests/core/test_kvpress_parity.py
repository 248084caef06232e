"""What kvpress users reach for: a pipeline answering several questions from one compressed context, a
press-style scope around ``model.generate``, per-layer ratios, and decoding schedules with a ratio."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import StoppingCriteria

import kvsqueeze
from kvsqueeze import CompressedCache, KVSqueezeError
from kvsqueeze.pipeline import answer
from tests.bench.conftest import CharTokenizer
from tests.conftest import tiny_model

CONTEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat. " * 2


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_pipeline_answers_every_question_from_one_compressed_context(model):
    tok = CharTokenizer()
    pipe = kvsqueeze.pipeline(model, tok, "snapkv:window=8", ratio=0.5)
    questions = ["who jumps?", "who sleeps?", "where?"]
    out = pipe(CONTEXT, questions=questions, max_new_tokens=5)
    assert len(out["answers"]) == 3 and out["stats"]["cache_bytes"] < out["stats"]["full_cache_bytes"]
    # each answer is the one a fresh fork of the same compressed context gives: earlier answers left no trace
    for q, got in zip(questions, out["answers"], strict=True):
        alone = pipe(CONTEXT, question=q, max_new_tokens=5)["answer"]
        assert got == alone
    with pytest.raises(KVSqueezeError, match="either question= or questions="):
        pipe(CONTEXT)
    with pytest.raises(KVSqueezeError, match="non-empty"):
        pipe(CONTEXT, questions=["ok", " "])
    for n in (0, -1, 2.5):  # transformers' ValueError (0, -1) or a silently truncated 2.5 before
        with pytest.raises(KVSqueezeError, match="max_new_tokens must be a whole number >= 1"):
            pipe(CONTEXT, question="who?", max_new_tokens=n)
        with pytest.raises(KVSqueezeError, match="max_new_tokens must be a whole number >= 1"):
            answer(model, tok, "none", CONTEXT, "who?", max_new_tokens=n)


def test_compress_scope_equals_an_explicit_cache_and_leaves_the_model_as_it_was(model):
    prompt = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(prompt).logits
        explicit = model.generate(prompt, past_key_values=CompressedCache(model, "snapkv:window=8", ratio=0.5),
                                  max_new_tokens=6, do_sample=False)  # fmt: skip
        with kvsqueeze.compress(model, "snapkv:window=8", ratio=0.5) as scope:
            scoped = model.generate(prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(scoped, explicit)
        assert scope.cache.stats()["tokens_kept_mean"] == 20 + 5
        with pytest.raises(RuntimeError), kvsqueeze.compress(model, "snapkv:window=8", ratio=0.5):
            raise RuntimeError("user code fails inside the scope")
        assert not model._forward_pre_hooks  # removed on exit, also after an exception
        assert torch.equal(model(prompt).logits, before)
    with pytest.raises(KVSqueezeError, match="ratio"):
        kvsqueeze.compress(model, "snapkv", ratio=1.5)


def test_per_layer_ratios(model):
    cache = CompressedCache(model, "knorm", ratio=[0.25, 0.75])
    cache.prefill(model, torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(2)))
    kept = [int(layer.kept_lengths()[0, 0]) for layer in cache.layers]
    assert kept == [30, 10]
    assert cache.stats()["ratio"] == [0.25, 0.75]
    with pytest.raises(KVSqueezeError, match="one ratio per layer: 2 layers, 3 ratios"):
        CompressedCache(model, "knorm", ratio=[0.5, 0.5, 0.5])
    with pytest.raises(KVSqueezeError, match="ratio must be"):
        CompressedCache(model, "knorm", ratio=[0.5, 1.0])


class Held(StoppingCriteria):
    def __init__(self, cache):
        self.cache, self.held, self.seen = cache, [], []

    def __call__(self, input_ids, scores, **kwargs):
        layer = self.cache.layers[0]
        self.held.append(int(layer.kept_lengths().max()))
        self.seen.append(layer.seen)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("spec", ["h2o+interval:every=4,ratio=0.5", "snapkv:window=4+interval:every=4"])
def test_decoding_schedule_with_a_ratio_of_all_tokens_seen(model, spec):
    """Every recompression keeps ceil((1 - ratio) × tokens seen): between two, never more than that + every − 1."""
    cache = CompressedCache(model, spec, ratio=None if "ratio=" in spec else 0.5)
    watch = Held(cache)
    prompt = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.generate(prompt, past_key_values=cache, max_new_tokens=30, min_new_tokens=30, do_sample=False,
                       stopping_criteria=[watch])  # fmt: skip
    for held, seen in zip(watch.held, watch.seen, strict=True):
        assert math.ceil(seen * 0.5) - 4 <= held <= math.ceil(seen * 0.5) + 4 - 1, (held, seen)
    with pytest.raises(KVSqueezeError, match="sets its own ratio"):
        CompressedCache(model, "h2o+interval:ratio=0.5", budget=64)
