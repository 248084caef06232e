"""The packed-block read path: fused attention over the whole-block dequantization equals attention from the codes
and exact attention over the materialized block; the group-run fast paths are bit-exact with the general ones."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.codecs.quant import ChannelQ
from kvsqueeze.core.attention_math import partial_attention
from kvsqueeze.spec import parse_method

# float32 paths that differ only in the order of their sums over <= 86 keys and 64 channels (scales folded into the
# query vs dequantized keys): a few dozen ulps; 128 ulps of margin
TOL = 128 * torch.finfo(torch.float32).eps


def _kv(n: int, d: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(d, generator=gen) * 4
    return torch.randn(n, d, generator=gen) * scale, torch.randn(n, d, generator=gen)


@pytest.mark.parametrize("tokens", [64, 70])  # whole groups; whole groups + a short one (two runs)
@pytest.mark.parametrize("m", [3, 12])  # a decode step (3 query heads per KV head); a multi-token block
def test_fused_attend_equals_attention_from_codes_and_exact_attention(tokens, m):
    codec = parse_method("kivi:bits=2,group=16,residual=0").codec
    B, H, D = 1, 3, 64
    k, v = _kv(B * H * tokens)
    block = codec.encode(k, v, torch.full((B, H), tokens))
    newer = codec.encode(*_kv(B * H * 16, seed=1), torch.full((B, H), 16))
    original = partial_attention(torch.ones(B, H, 1, D), k.view(B, H, tokens, D), v.view(B, H, tokens, D), 0.125)
    assert not torch.allclose(block.attend(torch.ones(B, H, 1, D), 0.125)[0], original[0], atol=1e-3)  # 2-bit codes
    for blk in (block, codec.extend(block, newer)):  # after a decode-time merge: up to three runs of groups
        q = torch.randn(B, H, m, D, generator=torch.Generator().manual_seed(2))
        out, lse = blk.attend(q, 0.125)
        ref_out, ref_lse = blk.attend_from_codes(q, 0.125)
        torch.testing.assert_close(out, ref_out, rtol=TOL, atol=TOL)
        torch.testing.assert_close(lse, ref_lse, rtol=TOL, atol=TOL)
        L = int(blk.lengths[0, 0])
        keys, values = blk.materialize(torch.float32)
        exact_out, exact_lse = partial_attention(q, keys.view(B, H, L, D), values.view(B, H, L, D), 0.125)
        torch.testing.assert_close(out, exact_out, rtol=TOL, atol=TOL)
        torch.testing.assert_close(lse, exact_lse, rtol=TOL, atol=TOL)


def test_channel_groups_of_equal_heads_are_bit_exact_with_the_general_path():
    # Equal heads (70 tokens, group 16: 16,16,16,16,6 per head) take the per-run paths of encode and dequant; the
    # same tokens with an extra empty head take the general ones (a scatter over groups, a gather of every token's
    # scale and zero): the same bits.
    x, _ = _kv(3 * 70)
    fast = ChannelQ.encode(x, torch.tensor([[70, 70, 70]]), 2, 16)
    slow = ChannelQ.encode(x, torch.tensor([[70, 70, 70, 0]]), 2, 16)
    assert fast.runs() == [(0, 4, 16), (4, 1, 6)] and slow.runs() is None
    assert fast.sizes.tolist() == slow.sizes.tolist() == [16, 16, 16, 16, 6] * 3
    for name in ("codes", "scale", "zero"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    assert torch.equal(fast.dequant(), slow.dequant())
    assert (fast.dequant() - x).abs().max() > 0.1  # 2-bit: a real quantization, not a copy
