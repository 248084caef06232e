"""Method `none` must reproduce transformers' DynamicCache logits exactly: the guard that the plumbing is right."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvsqueeze import CompressedCache
from tests.conftest import tiny_model


def greedy_logits(model, ids, cache, attention_mask=None, steps=20):
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=attention_mask if attention_mask is not None else torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    return torch.stack(out.logits), out.sequences


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma3"])
def test_none_matches_dynamic_cache_exactly(kind):
    model = tiny_model(kind)
    ids = torch.randint(1, 128, (1, 48), generator=torch.Generator().manual_seed(1))
    ref, ref_seq = greedy_logits(model, ids, DynamicCache(config=model.config))
    got, seq = greedy_logits(model, ids, CompressedCache(model, "none"))
    assert ref.shape[0] == 20
    assert torch.equal(seq, ref_seq)
    assert (ref - got).abs().max().item() == 0.0


def test_none_matches_dynamic_cache_with_left_padding():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (3, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    mask[2, :17] = 0
    ref, _ = greedy_logits(model, ids, DynamicCache(config=model.config), mask)
    got, _ = greedy_logits(model, ids, CompressedCache(model, "none"), mask)
    assert (ref - got).abs().max().item() == 0.0


@pytest.mark.model
def test_none_matches_dynamic_cache_on_smollm2(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 12, return_tensors="pt").input_ids
    ref, _ = greedy_logits(model, ids, DynamicCache(config=model.config))
    got, _ = greedy_logits(model, ids, CompressedCache(model, "none"))
    assert (ref - got).abs().max().item() == 0.0
