"""ZipCache: normalized attention scores, channel-separable token-wise keys, salient tokens at high bits."""

from __future__ import annotations

import torch

from kvsqueeze.codecs.quant import TokenQ
from kvsqueeze.codecs.zipcache import CSTQBlock, normalized_attention
from kvsqueeze.core.context import LayerContext
from kvsqueeze.spec import parse_method


def _ctx(L=24, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(1, 2, L, D, generator=gen), torch.randn(1, 2, L, D, generator=gen)
    keys[..., 3] *= 20.0
    queries = torch.randn(1, 4, L, D, generator=gen)
    ctx = LayerContext(0, 1, keys, values, queries, torch.ones(1, L, dtype=torch.bool), D**-0.5)
    ctx.stored = torch.ones(1, 2, L, dtype=torch.bool)
    return ctx


def test_normalized_attention_divides_by_queries_that_see_each_token():
    ctx = _ctx()
    L = ctx.length
    got = normalized_attention(ctx, probe=1.0)  # every query is a probe
    keys = ctx.keys.repeat_interleave(2, dim=1)
    logits = ctx.queries @ keys.transpose(-1, -2) * ctx.scaling
    attn = logits.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    expect = (attn.sum(2) / torch.arange(L, 0, -1)).view(1, 2, 2, L).mean(2)
    assert torch.allclose(got, expect, atol=1e-6)
    # Plain accumulated attention is biased toward early tokens (seen by more queries); normalized is not.
    acc = attn.sum(2).view(1, 2, 2, L).mean(2)
    assert acc[..., : L // 2].sum() / acc.sum() > got[..., : L // 2].sum() / got.sum()


def test_channel_separable_quantization_beats_plain_token_wise_on_outlier_channels():
    ctx = _ctx(L=64, seed=1)
    k = ctx.keys.flatten(0, 2)
    lengths = torch.tensor([[64, 64]])
    chan = torch.stack([k[:64].abs().amax(0).sqrt(), k[64:].abs().amax(0).sqrt()]).half()
    block = CSTQBlock.encode(k, k, lengths, chan, 2, 16)
    cstq = (block.materialize(torch.float32)[0] - k).norm()
    plain = (TokenQ.encode(k, 2, 16).dequant() - k).norm()
    assert cstq < 0.8 * plain
    q = torch.randn(1, 2, 3, 16)
    out, lse = block.attend(q, 0.25)
    from kvsqueeze.core.storage import KVBlock

    ref_out, ref_lse = KVBlock.attend(block, q, 0.25)
    assert torch.allclose(out, ref_out, atol=1e-4) and torch.allclose(lse, ref_lse, atol=1e-4)


def test_salient_tokens_stored_at_high_bits():
    ctx = _ctx(L=40, seed=2)
    codec = parse_method("zipcache:salient=0.25,probe=1.0,high=8,low=2").codec
    block = codec.encode(ctx.keys.flatten(0, 2), ctx.values.flatten(0, 2), torch.tensor([[40, 40]]), ctx)
    assert block.high.lengths.tolist() == [[10, 10]] and block.low.lengths.tolist() == [[30, 30]]
    scores = normalized_attention(ctx, 1.0)
    hk, _ = block.high.materialize(torch.float32)
    for h in range(2):
        top = scores[0, h].topk(10).indices.sort().values
        assert torch.allclose(hk[h * 10 : (h + 1) * 10], ctx.keys[0, h, top], atol=0.1)
