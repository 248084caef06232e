"""ThinK: pruned key channels are not stored, the kept ones are ThinK's criterion, attention uses exactly them."""

from __future__ import annotations

import torch

from kvsqueeze.codecs.think import ThinKBlock
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.context import LayerContext
from kvsqueeze.spec import parse_method
from tests.conftest import tiny_model

B, H, G, L, D = 2, 2, 2, 12, 8


def make(seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, L, D, generator=gen) * torch.linspace(0.1, 2.0, D)  # channels of different size
    values = torch.randn(B, H, L, D, generator=gen)
    queries = torch.randn(B, H * G, L, D, generator=gen)
    ctx = LayerContext(0, 1, keys, values, queries, torch.ones(B, L, dtype=torch.bool), D**-0.5)
    return keys, values, queries, ctx


def test_kept_channels_follow_the_query_key_criterion_and_pruned_ones_are_not_stored():
    keys, values, queries, ctx = make()
    codec = parse_method("think:prune=0.5,window=4").codec
    lengths = torch.full((B, H), L)
    block = codec.encode(keys.reshape(-1, D), values.reshape(-1, D), lengths, ctx)
    assert isinstance(block, ThinKBlock)
    assert block.keys.shape == (B * H * L, D // 2)  # half the key channels are gone from storage
    metadata = block.channels.numel() * 8 + block.lengths.numel() * 8  # kept-channel indices, [B, H] lengths
    assert block.nbytes() == (B * H * L * (D // 2) + B * H * L * D) * 4 + metadata
    stored = block.keys.view(B, H, L, D // 2)
    for b in range(B):
        for h in range(H):
            q = queries[b, h * G : (h + 1) * G, -4:].reshape(-1, D)  # window queries of the group
            score = torch.stack([torch.linalg.norm(torch.outer(q[:, c], keys[b, h, :, c])) for c in range(D)])
            expected = sorted(torch.topk(score, D // 2).indices.tolist())
            assert block.channels[b, h].tolist() == expected
            assert torch.equal(stored[b, h], keys[b, h][:, expected])


def test_attention_equals_exact_attention_over_the_kept_channels():
    keys, values, _, ctx = make(1)
    codec = parse_method("think:prune=0.75,window=6").codec
    block = codec.encode(keys.reshape(-1, D), values.reshape(-1, D), torch.full((B, H), L), ctx)
    q = torch.randn(B, H, 3, D)
    out, lse = block.attend(q, D**-0.5)
    for b in range(B):
        for h in range(H):
            kept = block.channels[b, h]
            logits = q[b, h][:, kept] @ keys[b, h][:, kept].T * D**-0.5
            assert torch.allclose(out[b, h], logits.softmax(-1) @ values[b, h], atol=1e-5)
            assert torch.allclose(lse[b, h], logits.logsumexp(-1), atol=1e-5)
    full_logits = q @ keys.transpose(-1, -2) * D**-0.5
    assert not torch.allclose(lse, full_logits.logsumexp(-1), atol=1e-3)  # pruning changed something
    mk, _ = block.materialize(torch.float32)  # transient view: zeros in the pruned channels
    assert int((mk.view(B, H, L, D) != 0).sum(-1).max()) == 2


def test_think_through_generate_keeps_pruning_appended_tokens():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 40))
    cache = CompressedCache(model, "snapkv:window=8+think:prune=0.5", ratio=0.5)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == 46
    block = cache.layers[0].blocks[0]
    assert isinstance(block, ThinKBlock) and block.keys.shape[-1] == 8  # head_dim 16, half pruned
    assert block.lengths.tolist() == [[25, 25]]  # 20 kept at prefill + 5 appended tokens, same channels
    per_layer = 2 * 25 * (8 + 16) * 4 + 2 * 8 * 8 + 2 * 8  # kept key channels + full values + channel indices + lengths
    assert cache.nbytes() == 2 * per_layer < 0.45 * cache.full_nbytes()
