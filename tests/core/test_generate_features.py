"""generate's features over a CompressedCache (assisted generation and prompt lookup crop the uncompressed tail;
beam search reorders rows) and the cache's lifecycle (what it holds, for which model, and every misuse as one
clear error)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvsqueeze import CompressedCache, KVSqueezeError
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def repetitive(n: int = 60) -> torch.Tensor:
    """A prompt that repeats itself, so prompt lookup proposes (and sometimes rejects) candidate tokens."""
    return ids(12, seed=5).repeat(1, n // 12)


def generate(model, prompt, cache, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=24, do_sample=False, **kwargs)
    return out[0, prompt.shape[-1] :]


def test_assisted_generation_with_a_draft_model(model):
    """The draft model's candidates are verified by multi-token forwards and rejected ones cropped: with ``none``
    exactly DynamicCache's assisted generation; with SnapKV the observation window keeps every draft of the first
    forward in full precision, so rejected ones can be cropped."""
    draft = tiny_model("llama", seed=3)
    prompt = ids(40, seed=2)
    reference = generate(model, prompt, DynamicCache(config=model.config), assistant_model=draft)
    assert torch.equal(generate(model, prompt, CompressedCache(model, "none"), assistant_model=draft), reference)
    cache = CompressedCache(model, "snapkv:window=8", ratio=0.5)
    out = generate(model, prompt, cache, assistant_model=draft)
    assert cache.get_seq_length() == 40 + out.shape[-1] - 1  # every rejected draft was cropped


def test_prompt_lookup_in_the_live_path(model):
    """transformers' first forward holds the prompt and the first drafts together, so they are compressed together
    (a documented deviation); rejected drafts that every head kept in full precision are cropped. (transformers'
    candidate generation feeds the whole prompt again to a prefilled cache — DynamicCache too — so assisted
    generation needs a fresh cache.)"""
    prompt = repetitive()
    reference = generate(model, prompt, DynamicCache(config=model.config), prompt_lookup_num_tokens=4)
    assert torch.equal(generate(model, prompt, CompressedCache(model, "none"), prompt_lookup_num_tokens=4), reference)
    cache = CompressedCache(model, "snapkv:window=8", ratio=0.5)  # the observation window keeps the drafts
    out = generate(model, prompt, cache, prompt_lookup_num_tokens=4)
    assert cache.get_seq_length() == prompt.shape[-1] + out.shape[-1] - 1  # every rejected draft was cropped
    with pytest.raises(KVSqueezeError, match="cannot crop"):  # knorm may drop a draft: no roll back possible
        generate(model, prompt, CompressedCache(model, "knorm+kivi:bits=4", ratio=0.5), prompt_lookup_num_tokens=4)


def test_crop_into_compressed_storage_is_refused(model):
    cache = CompressedCache(model, "knorm+kivi:bits=4,group=8,residual=8", ratio=0.5)
    cache.prefill(model, ids(40))
    with torch.no_grad():
        model(ids(5, seed=1), past_key_values=cache)  # held in the tail (a multi-token forward)
    with pytest.raises(KVSqueezeError, match="only the 5 newest can be removed"):
        cache.crop(-6)
    cache.crop(-3)
    assert cache.get_seq_length() == 42


def test_beam_search_none_equals_dynamic_cache(model):
    prompt = ids(30, seed=4)
    with torch.no_grad():
        ref = model.generate(prompt, past_key_values=DynamicCache(config=model.config), num_beams=3,
                             max_new_tokens=12, do_sample=False)  # fmt: skip
        got = model.generate(prompt, past_key_values=CompressedCache(model, "none"), num_beams=3,
                             max_new_tokens=12, do_sample=False)  # fmt: skip
    assert torch.equal(got, ref)


@pytest.mark.parametrize("spec", ["snapkv:window=8", "snapkv:window=8+adakv"])
def test_beam_search_reorders_compressed_rows(model, spec):
    prompt = ids(40, seed=6)
    cache = CompressedCache(model, spec, ratio=0.5)
    with torch.no_grad():
        out = model.generate(prompt, past_key_values=cache, num_beams=3, max_new_tokens=10, do_sample=False)
    assert out.shape == (1, 50)
    # the defining property of a reorder: every row of the result is the chosen row of the original
    cache = CompressedCache(model, spec, ratio=0.5)
    cache.prefill(model, torch.cat([ids(40, seed=6), ids(40, seed=7), ids(40, seed=8)]))
    before = [layer.kept_lengths().clone() for layer in cache.layers]
    keys = [layer.held()[0].clone() if not layer.blocks else layer.blocks[0].keys.clone() for layer in cache.layers]
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    for layer, lengths, old in zip(cache.layers, before, keys, strict=True):
        assert torch.equal(layer.kept_lengths(), lengths[[2, 0, 0]])
        if not layer.blocks:
            assert torch.equal(layer.keys, old[[2, 0, 0]])


def test_beam_search_over_packed_codes_is_one_clear_error(model):
    cache = CompressedCache(model, "knorm+kivi:bits=4,group=8,residual=8", ratio=0.5)
    with pytest.raises(KVSqueezeError, match="beam search over QuantBlock storage is not supported"):
        model.generate(ids(40), past_key_values=cache, num_beams=2, max_new_tokens=4, do_sample=False)


# ---- lifecycle --------------------------------------------------------------------------------------------------
def test_prefill_twice_is_refused(model):
    cache = CompressedCache(model, "snapkv:window=8", ratio=0.5)
    cache.prefill(model, ids(40))
    with pytest.raises(KVSqueezeError, match="already holds 40 tokens"):
        cache.prefill(model, ids(40))


def test_a_prompt_must_extend_the_cached_tokens(model):
    cache = CompressedCache(model, "snapkv:window=8", ratio=0.5)
    context = ids(40)
    cache.prefill(model, context)
    with pytest.raises(KVSqueezeError, match="does not extend the 40 tokens"):
        cache.fork().expect(context[:, :30])
    with pytest.raises(KVSqueezeError, match="does not start with the tokens"):
        cache.fork().expect(torch.cat([ids(40, seed=9), ids(3)], dim=-1))
    question = torch.cat([context, ids(3, seed=1)], dim=-1)
    assert torch.equal(cache.fork().expect(question), question[:, 40:])


def test_a_cache_continues_a_conversation_when_the_prompt_extends_it(model):
    """Documented behaviour: a second generate on a cache feeds only the new tokens; with method none this equals
    generating over the whole conversation with a fresh cache."""
    cache = CompressedCache(model, "none")
    first = ids(20, seed=10)
    with torch.no_grad():
        turn1 = model.generate(first, past_key_values=cache, max_new_tokens=6, do_sample=False)
        turn2_prompt = torch.cat([turn1, ids(5, seed=11)], dim=-1)
        continued = model.generate(turn2_prompt, past_key_values=cache, max_new_tokens=6, do_sample=False)
        fresh = model.generate(turn2_prompt, past_key_values=DynamicCache(config=model.config), max_new_tokens=6,
                               do_sample=False)  # fmt: skip
    assert torch.equal(continued, fresh)


def test_a_cache_built_for_another_model_is_refused(model):
    other = tiny_model("qwen2")
    cache = CompressedCache(other, "snapkv:window=8", ratio=0.5)
    with pytest.raises(KVSqueezeError, match="built for a qwen2 model"):
        generate(model, ids(40), cache)
    # the same configuration (another instance of the same model) is accepted
    twin = tiny_model("llama")
    generate(model, ids(40), CompressedCache(twin, "snapkv:window=8", ratio=0.5))


def test_a_batch_that_does_not_match_the_cached_rows_is_refused(model):
    cache = CompressedCache(model, "snapkv:window=8", ratio=0.5)
    cache.prefill(model, ids(40))
    with pytest.raises(KVSqueezeError, match="holds 1 row"):
        generate(model, torch.cat([ids(44), ids(44)]), cache.fork())
