"""AdaKV and PyramidKV: budgets sum exactly, AdaKV's safeguard, PyramidKV's monotone pyramid, real memory."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvsqueeze import CompressedCache
from kvsqueeze.core.storage import tensor_bytes
from kvsqueeze.policies.adakv import AdaKVBudget, safeguard
from kvsqueeze.policies.base import PROTECTED, select
from kvsqueeze.policies.pyramidkv import PyramidKVBudget, pyramid_budgets


def test_adakv_is_global_topk_beyond_the_safeguard(make_ctx):
    ctx = make_ctx(H=3, L=10)
    scores = torch.zeros(1, 3, 10)
    scores[0, 0, :] = torch.linspace(1.0, 0.9, 10)  # head 0: many high scores
    scores[0, 1, :] = torch.linspace(0.5, 0.0, 10)
    scores[0, 2, :] = torch.linspace(0.4, 0.0, 10)
    keep = torch.tensor([5])  # layer budget 15, safeguard floor(0.2*5) = 1 per head
    counts = AdaKVBudget().allocate(scores, keep, ctx)
    assert int(counts.sum()) == 15
    # Exactly: head 0 gets its 10 tokens (all > 0.5), heads 1 and 2 their safeguard + the next best globally.
    assert counts.tolist() == [[10, 3, 2]]
    mask = select(scores, counts, ctx.valid)
    beyond_guard = mask.clone()
    beyond_guard[..., 0] = False  # each head's best token is its safeguard (alpha=0.2, k=5 -> 1)
    # what is kept beyond the safeguards is a global top-k: it beats everything dropped, in any head
    assert scores[beyond_guard].min() > scores[~mask].max()


def test_adakv_never_starves_a_head_below_its_safeguard(make_ctx):
    ctx = make_ctx(H=4, L=50)
    scores = torch.zeros(1, 4, 50)
    for h in range(4):  # head 0 dominates everything, then head 1, head 2, head 3
        scores[0, h] = -h * 10.0 + torch.rand(50)
    keep = torch.tensor([20])
    for alpha in (0.0, 0.2, 0.5):
        counts = AdaKVBudget(alpha=alpha).allocate(scores, keep, ctx)
        assert int(counts.sum()) == 4 * 20
        assert int(counts.min()) >= safeguard(20, alpha)
    # without the safeguard heads 2 and 3 would be starved; with alpha=0.2 each keeps floor(0.2*20) = 4
    assert AdaKVBudget(alpha=0.0).allocate(scores, keep, ctx).tolist() == [[50, 30, 0, 0]]
    assert AdaKVBudget(alpha=0.2).allocate(scores, keep, ctx).tolist() == [[50, 22, 4, 4]]


def test_adakv_keeps_protected_tokens_and_ignores_padding(make_ctx):
    ctx = make_ctx(B=2, H=2, L=12)
    ctx.valid[1, :4] = False  # left padding on row 1
    scores = torch.rand(2, 2, 12)
    scores[..., -3:] = PROTECTED
    keep = torch.tensor([6, 4])
    counts = AdaKVBudget().allocate(scores, keep, ctx)
    assert counts.sum(-1).tolist() == [12, 8]
    mask = select(scores, counts, ctx.valid)
    assert mask[..., -3:].all()
    assert not mask[1, :, :4].any()


@pytest.mark.parametrize("m,keep,prot,n", [(30, 1024, 32, 2048), (30, 205, 32, 2048), (7, 13, 0, 40), (4, 35, 4, 40)])
def test_pyramid_budgets_monotone_and_exact(m, keep, prot, n):
    # (4, 35, 4, 40) is a short prompt (40 < 2 * 31): a pyramid only in the short_prompt=pyramid reading
    budgets = pyramid_budgets(m, keep, prot, n, beta=20.0, short_prompt="pyramid")
    assert sum(budgets) == m * keep
    assert all(a >= b for a, b in itertools.pairwise(budgets))
    assert all(prot <= b <= n for b in budgets)
    assert budgets[0] > budgets[-1]


def test_pyramid_paper_schedule():
    # k = 100 free tokens, beta = 20: top = 5, bottom = 195, linear in between
    budgets = pyramid_budgets(5, 100, 0, 1000, beta=20.0)
    assert budgets == [195, 148, 100, 52, 5]


def test_pyramid_allocate_sums_across_layers(make_ctx):
    scores = torch.rand(1, 2, 64)
    scores[..., -8:] = PROTECTED
    keep = torch.tensor([20])
    total = 0
    per_layer = []
    for layer in range(6):
        ctx = make_ctx(H=2, L=64, layer_idx=layer, num_layers=6)
        counts = PyramidKVBudget().allocate(scores, keep, ctx)
        assert (counts == counts[0, 0]).all()  # every head of a layer gets the layer's budget
        per_layer.append(int(counts[0, 0]))
        total += int(counts.sum())
    assert total == 6 * 2 * 20
    assert per_layer == sorted(per_layer, reverse=True) and per_layer[-1] >= 8


@pytest.mark.parametrize("method", ["snapkv:window=4+adakv", "snapkv:window=4+pyramidkv", "h2o+adakv"])
def test_generate_and_ragged_memory(tiny_model, method):
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (1, 40))
    cache = CompressedCache(tiny_model, method, ratio=0.5)
    out = tiny_model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 45)
    per_token = 2 * 16 * 4  # keys + values, head_dim 16, fp32
    held = 0
    for layer in cache.layers:
        lengths_bytes = 8 * sum(b.lengths.numel() for b in layer.blocks)  # each ragged block's [B, H] int64 lengths
        held += int(layer.kept_lengths().sum()) * per_token + lengths_bytes
        assert layer.nbytes() == int(layer.kept_lengths().sum()) * per_token + lengths_bytes
    assert cache.nbytes() == held
    kept_context = sum(int(layer.kept_lengths().sum()) - 2 * 4 for layer in cache.layers)  # minus 4 decoded/head
    assert kept_context == 2 * 2 * 20  # Σ over layers and heads = global budget


def test_adakv_storage_is_ragged(tiny_model):
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (1, 48))
    cache = CompressedCache(tiny_model, "snapkv:window=4+adakv", ratio=0.6)
    cache.prefill(tiny_model, ids)
    lengths = [cache.layers[i].kept_lengths() for i in range(2)]
    assert any(len(set(x.flatten().tolist())) > 1 for x in lengths)
    for x in lengths:
        assert int(x.sum()) == 2 * 20  # ceil(48 * 0.4) = 20 per head on average
        block_bytes = sum(b.nbytes() for b in cache.layers[0].blocks)
    payload = tensor_bytes(*(t for b in cache.layers[0].blocks for t in (b.keys, b.values, b.lengths)))
    assert block_bytes == payload  # kept keys and values, compact, plus each block's [B, H] lengths
