"""RotateKV: the Hadamard rotation is orthogonal and exactly invertible; reordering balances outlier channels;
rotation lowers 2-bit error on outlier-heavy keys; sinks stay at full precision."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.codecs.quant import TokenQ
from kvsqueeze.codecs.rotatekv import fwht, outlier_order
from kvsqueeze.core.storage import KVBlock
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import parse_method

CTX = object()  # any non-None context: a prefill compression


@pytest.mark.parametrize("n,block", [(64, 64), (64, 16), (128, 128), (8, 2)])
def test_hadamard_orthogonal_and_self_inverse(n, block):
    H = fwht(torch.eye(n, dtype=torch.float64), block)
    assert torch.allclose(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    nz = H[H != 0].abs()
    assert nz.numel() == n * block and torch.allclose(nz, torch.full_like(nz, block**-0.5))
    x = torch.randn(7, 3, n, dtype=torch.float64)
    assert torch.allclose(fwht(fwht(x, block), block), x, atol=1e-12)
    # Dot products are preserved (what attention over rotated storage relies on).
    y = torch.randn(7, 3, n, dtype=torch.float64)
    assert torch.allclose((fwht(x, block) * fwht(y, block)).sum(-1), (x * y).sum(-1), atol=1e-10)
    with pytest.raises(KVSqueezeError):
        fwht(torch.zeros(2, 12))


def _outlier_keys(n=256, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    x[:, [5, 9, 17, 40]] *= 25.0  # outlier channels
    return x


def test_reordering_deals_outlier_channels_to_different_groups():
    perm = outlier_order(_outlier_keys(), 16)
    groups = perm.view(4, 16)
    assert sorted(perm.tolist()) == list(range(64))
    for g in range(4):  # each Hadamard group of 16 gets exactly one of the four outlier channels
        assert len({5, 9, 17, 40} & set(groups[g].tolist())) == 1


def test_rotation_lowers_two_bit_error_on_outlier_keys():
    k = _outlier_keys()
    v = torch.randn_like(k)
    plain = (TokenQ.encode(k, 2, 32).dequant() - k).norm()
    block = parse_method("rotatekv:sinks=0").codec.encode(k, v, torch.tensor([[256]]), CTX)
    rotated = (block.materialize(torch.float32)[0] - k).norm()
    assert rotated < 0.7 * plain


def test_sinks_kept_exactly_and_attend_matches_materialized():
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(70, 64, generator=gen), torch.randn(70, 64, generator=gen)
    k[0] *= 50
    lengths = torch.tensor([[40, 30]])
    block = parse_method("rotatekv:sinks=2,block=16").codec.encode(k, v, lengths, CTX)
    mk, _ = block.materialize(torch.float32)
    for start in (0, 40):  # each head's first two tokens are stored in fp16
        assert torch.equal(mk[start : start + 2], k[start : start + 2].half().float())
    q = torch.randn(1, 2, 3, 64, generator=gen)
    out, lse = block.attend(q, 0.125)
    ref_out, ref_lse = KVBlock.attend(block, q, 0.125)
    assert torch.allclose(out, ref_out, atol=1e-4) and torch.allclose(lse, ref_lse, atol=1e-4)


def test_decode_flush_quantized_with_the_blocks_permutation():
    codec = parse_method("rotatekv:sinks=1").codec
    gen = torch.Generator().manual_seed(4)
    k, v = _outlier_keys(64), torch.randn(64, 64, generator=gen)
    block = codec.encode(k, v, torch.tensor([[64]]), CTX)
    nk, nv = _outlier_keys(32, seed=5), torch.randn(32, 64, generator=gen)
    raw = codec.encode(nk, nv, torch.tensor([[32]]))  # no context: a flush, held raw until extend
    merged = codec.extend(block, raw)
    assert merged.lengths.tolist() == [[96]] and torch.equal(merged.perm, block.perm)
    mk, _ = merged.materialize(torch.float32)
    assert (mk[64:] - nk).norm() < 0.7 * (TokenQ.encode(nk, 2, 32).dequant() - nk).norm()
