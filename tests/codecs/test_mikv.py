"""MiKV: the scorer's top tokens are stored at high bits, the rest at low bits, none dropped."""

from __future__ import annotations

import torch

from kvsqueeze import CompressedCache
from kvsqueeze.core.context import LayerContext
from kvsqueeze.spec import parse_method


def _ctx(B=1, H=2, L=40, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(B, H, L, D, generator=gen), torch.randn(B, H, L, D, generator=gen)
    ctx = LayerContext(0, 1, keys, values, None, torch.ones(B, L, dtype=torch.bool), D**-0.5)
    ctx.scores = torch.rand(B, H, L, generator=gen)
    ctx.stored = torch.ones(B, H, L, dtype=torch.bool)
    return ctx


def test_top_scored_tokens_at_high_precision():
    ctx = _ctx()
    codec = parse_method("mikv:high=8,low=2,ratio=0.75,group=8").codec
    block = codec.encode(ctx.keys.flatten(0, 2), ctx.values.flatten(0, 2), torch.full((1, 2), 40), ctx)
    assert block.high.lengths.tolist() == [[10, 10]] and block.low.lengths.tolist() == [[30, 30]]
    hk, _ = block.high.materialize(torch.float32)
    lk, _ = block.low.materialize(torch.float32)
    for h in range(2):
        top = ctx.scores[0, h].topk(10).indices.sort().values
        expect = ctx.keys[0, h, top]
        assert torch.allclose(hk[h * 10 : (h + 1) * 10], expect, atol=0.05)
        rest = torch.ones(40, dtype=torch.bool)
        rest[top] = False
        low_err = (lk[h * 30 : (h + 1) * 30] - ctx.keys[0, h, rest]).abs().mean()
        assert low_err > 5 * (hk[h * 10 : (h + 1) * 10] - expect).abs().mean()  # low bits really are coarser
    # Bytes: 8-bit + 2-bit codes, not 8-bit for all.
    all_high = parse_method("mikv:high=8,low=8,ratio=0.75,group=8").codec
    assert (
        block.nbytes()
        < 0.7 * all_high.encode(ctx.keys.flatten(0, 2), ctx.values.flatten(0, 2), torch.full((1, 2), 40), ctx).nbytes()
    )


def test_snapkv_mikv_keeps_every_token_and_uses_snapkv_scores(llama):
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(1))
    cache = CompressedCache(llama, "snapkv:window=8+mikv:ratio=0.5,group=8", ratio=0.0)
    with torch.no_grad():
        llama(ids, past_key_values=cache)
    for layer in cache.layers:
        block = layer.blocks[0]
        assert layer.kept_lengths().tolist() == [[60, 60]]  # nothing evicted
        assert block.high.lengths.tolist() == [[30, 30]] and block.low.lengths.tolist() == [[30, 30]]
    out = llama.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=cache, pad_token_id=0)
    assert out.shape[-1] == 70
