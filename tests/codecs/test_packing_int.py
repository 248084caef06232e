"""Packing round-trips bit-exactly; uniform quantization error ≤ scale/2; KIVI's bytes match its formula."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.codecs.packing import pack, packed_width, unpack, unpack_float
from kvsqueeze.codecs.quant import ChannelQ, TokenQ
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import parse_method


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 8, 13, 64])
def test_pack_roundtrip_bit_exact(bits, n):
    codes = torch.randint(0, 2**bits, (5, 3, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == packed_width(n, bits) == (n + 7) // 8 * bits
    assert torch.equal(unpack(packed, bits, n), codes)
    assert torch.equal(unpack_float(packed, bits, n), codes.float())


def test_pack_layouts():
    # 2-bit: four codes per byte, lowest bits first; 1-bit: eight signs per byte; 3-bit: 8 codes in 3 bytes.
    assert pack(torch.tensor([1, 2, 3, 0, 0, 0, 0, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4, 0]
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0b10000001]
    assert pack(torch.arange(8), 3).numel() == 3
    with pytest.raises(KVSqueezeError):
        pack(torch.zeros(8), 9)


def _data(n=96, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * torch.rand(d, generator=gen) * 4
    x[:, 3] += 20.0  # an outlier channel
    return x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("size", [0, 16])
def test_token_quant_error_within_half_scale(bits, size):
    x = _data()
    q = TokenQ.encode(x, bits, size)
    err = (q.dequant() - x).abs().view(x.shape[0], -1, size or 64)
    assert bool((err <= q.scale.float()[..., None] / 2 + 1e-5).all())
    assert q.codes.shape == (96, 64 * bits // 8)  # really packed


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_channel_quant_error_within_half_scale_ragged(bits):
    x = _data(n=70)
    lengths = torch.tensor([[40, 30]])  # two heads, 40 and 30 tokens; group 16 -> sizes 16,16,8,16,14
    q = ChannelQ.encode(x, lengths, bits, 16)
    assert q.sizes.tolist() == [16, 16, 8, 16, 14] and q.counts == [3, 2]
    scale = q.scale.float().repeat_interleave(q.sizes.long(), 0)
    assert bool(((q.dequant() - x).abs() <= scale / 2 + 1e-5).all())


def test_quant_error_bound_is_tight_enough_to_fail():
    # The bound is a real check: 2-bit error on this data is much larger than an 8-bit scale's half.
    x = _data()
    err2 = (TokenQ.encode(x, 2).dequant() - x).abs().max()
    assert err2 > TokenQ.encode(x, 8).scale.float().max() / 2


def test_kivi2_effective_bits_match_formula():
    # KIVI-2, group 32, no residual: 2 bits + fp16 scale and zero per 32 elements = 3 bits per element.
    from kvsqueeze.core.storage import KVBlock

    B, H, L, D = 1, 3, 256, 64
    codec = parse_method("kivi:bits=2,group=32,residual=0").codec
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(B * H * L, D, generator=gen), torch.randn(B * H * L, D, generator=gen)
    block: KVBlock = codec.encode(k, v, torch.full((B, H), L))
    formula = 2 + 2 * 16 / 32
    assert abs(block.bits_per_element() - formula) / formula < 0.05
    assert block.nbytes() < k.numel() * 2 * 4 * 3.1 / 32  # ~3 of 32 bits of fp32


def test_kivi_extend_merges_and_matches_separate_blocks():
    codec = parse_method("kivi:bits=4,group=8,residual=0").codec
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([[13, 20]])
    k, v = torch.randn(33, 16, generator=gen), torch.randn(33, 16, generator=gen)
    nk, nv = torch.randn(16, 16, generator=gen), torch.randn(16, 16, generator=gen)
    old = codec.encode(k, v, lengths)
    new = codec.encode(nk, nv, torch.tensor([[8, 8]]))
    merged = codec.extend(old, new)
    mk, mv = merged.materialize(torch.float32)
    ok, ov = old.materialize(torch.float32)
    nk2, nv2 = new.materialize(torch.float32)
    expect_k = torch.cat([ok[:13], nk2[:8], ok[13:], nk2[8:]])
    expect_v = torch.cat([ov[:13], nv2[:8], ov[13:], nv2[8:]])
    assert torch.equal(mk, expect_k) and torch.equal(mv, expect_v)
    # one block: the codes and scales of both, one [B, H] int64 lengths tensor instead of two
    assert merged.lengths.tolist() == [[21, 28]] and merged.nbytes() == old.nbytes() + new.nbytes() - 2 * 8


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_relative_error_and_bytes(fmt):
    codec = parse_method(f"fp8:format={fmt}").codec
    x = _data(n=64)
    block = codec.encode(x, x * 0.5, torch.tensor([[40, 24]]))
    k, _ = block.materialize(torch.float32)
    rel = {"e4m3": 2**-4, "e5m2": 2**-3}[fmt]  # half an ulp of the 3/2-bit mantissa
    scale = block.keys.scale.repeat_interleave(block.keys.sizes.long())[:, None]
    assert bool(((k - x).abs() <= rel * x.abs() + scale * 2**-6).all())
    assert block.keys.data.dtype.itemsize == 1 and 8.0 <= block.bits_per_element() < 8.1


def test_bad_codec_parameters_raise_one_line():
    with pytest.raises(KVSqueezeError, match="bits"):
        parse_method("int:bits=5")
    with pytest.raises(KVSqueezeError, match="divide"):
        parse_method("int:size=24").codec.encode(torch.zeros(4, 64), torch.zeros(4, 64), torch.tensor([[4]]))


def test_effective_bits_of_a_cache_count_metadata_and_the_full_precision_tail(llama):
    from kvsqueeze import CompressedCache
    from kvsqueeze.codecs.quant import effective_bits

    ids = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    dense = CompressedCache(llama, "none")
    llama(ids, past_key_values=dense)
    assert effective_bits(dense) == 32.0
    cache = CompressedCache(llama, "kivi:bits=2,group=16,residual=16")
    llama(ids, past_key_values=cache)
    # 48 tokens at 2 bits + fp16 scale/zero per 16 elements (4 bits) and 16 fp32 tokens, per head.
    assert abs(effective_bits(cache) - (48 * 4 + 16 * 32) / 64) < 0.2
