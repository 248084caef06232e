"""Ragged blocks (heads holding different counts) attend in one padded, masked call that equals attention head by
head over the block's own materialized keys and values (the reference: a loop over (row, head) segments)."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.core.attention_math import partial_attention
from kvsqueeze.core.context import LayerContext
from kvsqueeze.core.storage import DenseBlock, interleave_segments
from kvsqueeze.spec import parse_method

B, H, G, D = 2, 3, 2, 16
LENGTHS = torch.tensor([[5, 0, 9], [1, 7, 3]])
# float32 throughout; a softmax over <= 9 keys and a D-term dot product: a few hundred ulps at most
TOL = 256 * torch.finfo(torch.float32).eps


def reference(block, q, scaling):
    keys, values = block.materialize(torch.float32)
    out = torch.zeros(B, H, q.shape[2], values.shape[-1])
    lse = torch.full((B, H, q.shape[2]), float("-inf"))
    sizes = LENGTHS.flatten().tolist()
    for i, (k, v) in enumerate(zip(keys.split(sizes), values.split(sizes), strict=True)):
        if k.shape[0]:
            b, h = divmod(i, H)
            out[b, h], lse[b, h] = partial_attention(q[b, h], k, v, scaling)
    return out, lse


def context(keys, values):
    L = int(LENGTHS.max())
    queries = torch.randn(B, H * G, 4, D, generator=torch.Generator().manual_seed(3))
    return LayerContext(0, 1, keys.new_zeros(B, H, L, D), values, queries, torch.ones(B, L, dtype=torch.bool), 0.25)


@pytest.mark.parametrize(
    "codec",
    ["dense", "think:prune=0.5,window=4", "cskv:rank_k=8,rank_v=8", "int:bits=8", "gear", "qjl", "kivi:group=4"],
)
def test_ragged_block_attends_like_head_by_head(codec):
    gen = torch.Generator().manual_seed(0)
    n = int(LENGTHS.sum())
    keys, values = torch.randn(n, D, generator=gen), torch.randn(n, D, generator=gen)
    codec = parse_method(codec).codec
    if codec.is_dense:
        block = DenseBlock(keys, values, LENGTHS)
    else:
        block = codec.encode(keys, values, LENGTHS, context(keys, values))
    assert not block.uniform
    q = torch.randn(B, H, G, D, generator=gen)
    out, lse = block.attend(q, 0.25)
    ref_out, ref_lse = reference(block, q, 0.25)
    empty = LENGTHS == 0
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()
    torch.testing.assert_close(out, ref_out, rtol=TOL, atol=TOL)
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], rtol=TOL, atol=TOL)


def test_interleave_segments_equals_the_loop():
    a_counts, b_counts = [2, 0, 3], [1, 4, 0]
    a, b = torch.arange(5), torch.arange(100, 105)
    parts = []
    for x, y in zip(a.split(a_counts), b.split(b_counts), strict=True):
        parts += [x, y]
    assert torch.equal(interleave_segments(a, a_counts, b, b_counts), torch.cat(parts))


def test_gear_ragged_low_rank_term_equals_the_per_head_products():
    gen = torch.Generator().manual_seed(4)
    n = int(LENGTHS.sum())
    keys, values = torch.randn(n, D, generator=gen), torch.randn(n, D, generator=gen)
    codec = parse_method("gear").codec
    block = codec.encode(keys, values, LENGTHS, context(keys, values))
    part = block.keys
    assert part.A is not None and len(set(part.sizes)) > 1
    low = [a @ b for a, b in zip(part.A.float().split(part.sizes), part.B.float(), strict=True)]
    expected = part.quant.dequant(torch.float32) + torch.cat(low)
    if part.out_idx is not None:
        expected = expected.scatter(1, part.out_idx.long(), part.out_val.float())
    torch.testing.assert_close(part.dequant(torch.float32), expected, rtol=TOL, atol=TOL)
