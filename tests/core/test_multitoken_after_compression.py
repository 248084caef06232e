"""A multi-token forward after compression stays causal for codecs that flush the tail into blocks."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from kvsqueeze import CompressedCache
from tests.conftest import tiny_model


def test_chunk_after_compression_attends_causally():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, past_key_values=DynamicCache()).logits[:, 30:]
        cache = CompressedCache(model, "think:prune=0")  # every channel kept: storage exact, residual 0
        cache.prefill(model, ids[:, :30])
        out = model(ids[:, 30:], past_key_values=cache).logits
        assert cache.layers[0].keys.shape[-2] == 10  # the chunk waits in the tail (masked causally) ...
        model(ids[:, :1], past_key_values=cache)
    assert cache.layers[0].keys.shape[-2] == 0  # ... and is flushed into blocks at the next update
    assert torch.allclose(out, ref, atol=1e-5)
