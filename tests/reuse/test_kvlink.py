"""KVLink: documents' caches computed alone and concatenated with their keys re-encoded to global positions equal
what each document gives when encoded alone *at* those positions; recomputed boundary tokens equal a full
prefill's; generation continues from the linked cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvsqueeze import CompressedCache, KVSqueezeError
from kvsqueeze.reuse.kvlink import encode_document, link
from tests.conftest import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
EPS32 = torch.finfo(torch.float32).eps


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def prefill(model, token_ids, positions=None) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=token_ids, position_ids=positions, past_key_values=cache, use_cache=True)
    return cache


def close(a, b, scale=1.0) -> bool:
    tol = 16 * EPS32 * scale  # the same function through one more float32 rotation (measured <= 5 eps)
    return torch.allclose(a, b, atol=tol, rtol=tol)


def test_keys_are_re_encoded_to_their_global_positions():
    model = tiny_model("llama")
    docs = [ids(20, 1), ids(15, 2), ids(12, 3)]
    linked = link(model, [encode_document(model, d) for d in docs])
    assert linked.get_seq_length() == 47 and torch.equal(linked.tokens, torch.cat(docs, -1))
    offset = 0
    for d in docs:
        n = d.shape[-1]
        alone_there = prefill(model, d, torch.arange(offset, offset + n)[None])  # alone, at its global place
        for mine, ref in zip(linked.layers, alone_there.layers, strict=True):
            scale = float(ref.keys.abs().max())
            assert close(mine.keys[:, :, offset : offset + n], ref.keys, scale)
            assert close(mine.values[:, :, offset : offset + n], ref.values, float(ref.values.abs().max()))
        offset += n


def test_recomputed_boundary_tokens_equal_a_full_prefill():
    model = tiny_model("llama")
    docs = [ids(20, 4), ids(16, 5)]
    linked = link(model, [encode_document(model, d) for d in docs], recompute=4)
    full = prefill(model, torch.cat(docs, -1))
    for mine, ref in zip(linked.layers, full.layers, strict=True):
        assert close(mine.keys[:, :, :24], ref.keys[:, :, :24], float(ref.keys.abs().max()))
    # the rest of the second document was computed alone: it differs from the full prefill beyond layer 0
    assert not torch.allclose(linked.layers[1].keys[:, :, 24:], full.layers[1].keys[:, :, 24:], atol=1e-4)
    everything = link(model, [encode_document(model, d) for d in docs], recompute=16)
    for mine, ref in zip(everything.layers, full.layers, strict=True):
        assert close(mine.keys, ref.keys, float(ref.keys.abs().max()))


def test_generation_continues_from_the_linked_cache():
    model = tiny_model("llama")
    docs = [ids(20, 6), ids(10, 7)]
    linked = link(model, [encode_document(model, d) for d in docs], recompute=2)
    prompt = torch.cat([*docs, ids(4, 8)], dim=-1)
    out = model.generate(prompt, past_key_values=linked, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 37) and linked.get_seq_length() == 36
    with pytest.raises(KVSqueezeError, match="uncompressed caches of one document"):
        compressed = CompressedCache(model, "knorm", ratio=0.5)
        compressed.prefill(model, docs[0])
        link(model, [compressed])
    with pytest.raises(KVSqueezeError, match="full-attention"):
        gemma = tiny_model("gemma3")
        link(gemma, [encode_document(gemma, docs[0])])
