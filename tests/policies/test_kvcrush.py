"""KVCrush: head-behaviour bits, anchor-ordered buckets, and a representative kept for the behaviour group the
base importance method would evict entirely."""

from __future__ import annotations

import torch

from kvsqueeze import CompressedCache
from kvsqueeze.policies.base import select
from kvsqueeze.policies.kvcrush import KVCrush, head_bits, representatives


def test_representatives_one_per_bucket_in_anchor_order():
    bits = torch.tensor([[1, 1], [0, 0], [1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.bool)
    anchor = torch.tensor([1, 1], dtype=torch.bool)
    cand = torch.ones(6, dtype=torch.bool)
    # distances: 0, 2, 1, 1, 0, 2 -> order 0, 4, 2, 3, 1, 5 -> three buckets of two: first of each
    assert representatives(bits, cand, 3, anchor).tolist() == [0, 2, 1]
    assert representatives(bits, cand, 0, anchor).numel() == 0
    assert head_bits(torch.tensor([[1.0, 0.0, 2.0]])).flatten().tolist() == [True, False, True]


def test_kvcrush_keeps_a_proxy_of_the_evicted_group(make_ctx):
    L, w = 20, 2
    ctx = make_ctx(H=1, L=L, groups=2)  # two query heads share the KV head
    att = torch.full((1, 2, w, L), 0.001)
    att[:, 0, :, 0:8] = 0.1  # head 0 attends tokens 0-7 strongly (the base method's favourites)
    att[:, 1, :, 8:18] = 0.02  # head 1 spreads weakly over tokens 8-17
    ctx.window_attention = lambda window: att
    ctx.keep = torch.tensor([8])  # window 2 + 6 free: 4 base + 2 representatives (crush 1/3)
    scores = KVCrush(crush=1 / 3, window=w, kernel=1, anchor="ones").score(ctx)
    keep = select(scores, torch.tensor([[8]]), ctx.valid)[0, 0]
    assert keep[-w:].all() and int(keep.sum()) == 8
    assert int(keep[0:8].sum()) >= 4  # the base picks from head 0's group
    assert keep[8:18].any()  # head 1's group keeps a representative
    plain = KVCrush(crush=0.0, window=w, kernel=1).score(ctx)
    assert not select(plain, torch.tensor([[8]]), ctx.valid)[0, 0, 8:18].any()  # without KVCrush it is evicted


def test_kvcrush_generate(tiny_model):
    torch.manual_seed(11)
    ids = torch.randint(0, 128, (2, 40))
    cache = CompressedCache(tiny_model, "kvcrush:window=4", ratio=0.5)
    out = tiny_model.generate(ids, past_key_values=cache, max_new_tokens=2, do_sample=False)
    assert out.shape == (2, 42)
    assert all((layer.kept_lengths() == 21).all() for layer in cache.layers)
