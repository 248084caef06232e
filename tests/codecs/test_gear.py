"""GEAR: quantization + low-rank residual + sparse outliers beats the plain quantizer at the same bits."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.codecs.quant import ChannelQ, TokenQ
from kvsqueeze.spec import parse_method


def _kv(seed=0, n=128, d=64):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 6, generator=gen) @ torch.randn(6, d, generator=gen)  # low-rank structure
    x = base + 0.3 * torch.randn(n, d, generator=gen)
    spikes = torch.rand(n, d, generator=gen) < 0.01
    return x + spikes * 30.0 * torch.randn(n, d, generator=gen).sign()


@pytest.mark.parametrize("backbone", ["kivi", "token"])
@pytest.mark.parametrize("bits", [2, 4])
def test_gear_error_below_plain_quantizer(backbone, bits):
    k, v = _kv(0), _kv(1)
    lengths = torch.tensor([[64, 64]])
    block = parse_method(f"gear:bits={bits},backbone={backbone}").codec.encode(k, v, lengths)
    gk, gv = block.materialize(torch.float32)
    plain_k = ChannelQ.encode(k, lengths, bits, 32) if backbone == "kivi" else TokenQ.encode(k, bits, 32)
    plain_v = TokenQ.encode(v, bits, 32)
    assert (gk - k).norm() <= (plain_k.dequant() - k).norm()
    assert (gv - v).norm() <= (plain_v.dequant() - v).norm()
    # Each part matters: without low rank and outliers GEAR is the plain quantizer (same error).
    bare = parse_method(f"gear:bits={bits},backbone={backbone},rank=0,outliers=0").codec.encode(k, v, lengths)
    assert torch.allclose(bare.materialize(torch.float32)[1], plain_v.dequant(), atol=1e-6)


def test_gear_restores_outliers_exactly_and_low_rank_shrinks_residual():
    k, v = _kv(2), _kv(3)
    lengths = torch.tensor([[128]])
    block = parse_method("gear:bits=2,outliers=0.05,rank=0").codec.encode(k, v, lengths)
    idx = block.values.out_idx.long()
    _, gv = block.materialize(torch.float32)
    assert torch.equal(gv.gather(1, idx), v.gather(1, idx).half().float())
    assert torch.equal(v.abs().topk(idx.shape[1], dim=-1).indices.sort(-1).values, idx.sort(-1).values)
    with_rank = parse_method("gear:bits=2,outliers=0.05,rank=4").codec.encode(k, v, lengths)
    assert (with_rank.materialize(torch.float32)[1] - v).norm() < (gv - v).norm()
