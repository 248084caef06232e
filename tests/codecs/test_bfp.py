"""BFP: shared exponent per block, mantissa error ≤ half a step; K-sort puts outlier channels in one block."""

from __future__ import annotations

import torch

from kvsqueeze.codecs.bfp import BFPTensor, ksort
from kvsqueeze.spec import parse_method

CTX = object()


def _keys(n=128, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    x[:, [3, 20, 37, 50]] *= 40.0
    return x


def test_bfp_error_within_half_step_and_exponent_shared():
    x = _keys()
    t = BFPTensor.encode(x, 4, 16)
    step = torch.exp2(t.exps.float()).repeat_interleave(16, dim=1)
    assert bool(((t.dequant() - x).abs() <= step / 2 + 1e-6).all())
    assert t.exps.dtype == torch.int8 and t.exps.shape == (128, 4) and t.codes.shape == (128, 32)
    amax = x.view(128, 4, 16).abs().amax(-1)
    assert bool((amax <= 7 * torch.exp2(t.exps.float())).all() and (amax > 3.5 * torch.exp2(t.exps.float())).all())


def test_ksort_groups_outliers_and_lowers_error():
    x = _keys()
    perm = ksort(x)
    assert set(perm[:4].tolist()) == {3, 20, 37, 50}  # the four outlier channels share the first block
    plain = BFPTensor.encode(x, 4, 16).dequant()
    codec = parse_method("bfp:bits=4,block=16").codec
    block = codec.encode(x, x.clone(), torch.tensor([[128]]), CTX)
    normal = torch.ones(64, dtype=torch.bool)
    normal[[3, 20, 37, 50]] = False
    # Channels that no longer share an exponent with an outlier are far more precise.
    sorted_err = (block.materialize(torch.float32)[0] - x)[:, normal].norm()
    assert sorted_err < 0.65 * (plain - x)[:, normal].norm()
    assert torch.allclose(block.materialize(torch.float32)[1], plain)  # values: plain BFP


def test_bfp_flush_uses_the_blocks_channel_order():
    codec = parse_method("bfp").codec
    x = _keys(64)
    block = codec.encode(x, x, torch.tensor([[64]]), CTX)
    new = _keys(32, seed=1)
    merged = codec.extend(block, codec.encode(new, new, torch.tensor([[32]])))
    mk, _ = merged.materialize(torch.float32)
    assert merged.lengths.tolist() == [[96]] and torch.equal(mk[:64], block.materialize(torch.float32)[0])
    normal = torch.ones(64, dtype=torch.bool)
    normal[[3, 20, 37, 50]] = False
    plain = BFPTensor.encode(new, 4, 16).dequant()
    assert (mk[64:] - new)[:, normal].norm() < 0.65 * (plain - new)[:, normal].norm()
