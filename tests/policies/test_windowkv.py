"""WindowKV: whole windows of consecutive tokens ranked by observation-window attention, the task type choosing the
window setting (and the training-free ``auto`` stand-in for the paper's classifier), intra-group index sharing."""

from __future__ import annotations

import torch

from kvsqueeze import CompressedCache
from kvsqueeze.policies.base import select
from kvsqueeze.policies.windowkv import WindowKV


def stub(ctx, votes: torch.Tensor, w: int) -> None:
    """Observation-window attention whose sum over the window is ``votes [B, Hq, L]``."""
    ctx.window_attention = lambda window: (votes / w)[:, :, None, :].expand(-1, -1, w, -1)


def test_localization_keeps_whole_windows_aggregation_finer(make_ctx):
    L, w = 28, 4
    ctx = make_ctx(H=1, L=L)
    votes = torch.full((1, 1, L), 0.01)
    votes[..., 9] = 0.9  # one peak in window 1 (tokens 8-15 with size 8)
    votes[..., 18] = 0.5  # a second peak in window 2 (tokens 16-23)
    stub(ctx, votes, w)
    loc = WindowKV(window=w, task="localization", size=8, group=1).score(ctx)
    keep = select(loc, torch.tensor([[12]]), ctx.valid)[0, 0]
    expected = torch.zeros(L, dtype=torch.bool)
    expected[8:16] = True  # the best window, whole (not just the peak token)
    expected[L - w :] = True
    assert torch.equal(keep, expected)
    agg = WindowKV(window=w, task="aggregation", agg_size=2, group=1).score(ctx)
    keep = select(agg, torch.tensor([[8]]), ctx.valid)[0, 0]
    expected = torch.zeros(L, dtype=torch.bool)
    expected[[8, 9, 18, 19]] = True  # two fine windows, one around each peak
    expected[L - w :] = True
    assert torch.equal(keep, expected)


def test_auto_task_from_attention_concentration(make_ctx):
    L, w = 68, 4
    ctx = make_ctx(H=1, L=L)
    peaked = torch.full((1, 1, L), 0.001)
    peaked[..., 20:24] = 1.0
    flat = torch.ones(1, 1, L)
    scorer = WindowKV(window=w, group=1)
    body = torch.ones(L, dtype=torch.bool)
    body[L - w :] = False
    assert scorer.task_of(peaked[0], body) == "localization"
    assert scorer.task_of(flat[0], body) == "aggregation"
    stub(ctx, flat, w)
    scorer.score(ctx)
    assert ctx.scratch["windowkv"]["tasks"] == ["aggregation"]


def test_intra_group_index_sharing(make_ctx):
    L, w = 24, 4
    first, second = make_ctx(H=2, L=L, layer_idx=0), make_ctx(H=2, L=L, layer_idx=1)
    second.shared = first.shared  # one cache
    a = torch.rand(1, 2, L, generator=torch.Generator().manual_seed(0))
    b = torch.rand(1, 2, L, generator=torch.Generator().manual_seed(1))
    stub(first, a, w)
    stub(second, b, w)
    scorer = WindowKV(window=w, task="localization", size=4, group=2)
    counts = torch.tensor([[10, 10]])
    keep0 = select(scorer.score(first), counts, first.valid)
    keep1 = select(scorer.score(second), counts, second.valid)
    assert torch.equal(keep0, keep1)  # layer 1 reuses layer 0's indices
    alone = make_ctx(H=2, L=L, layer_idx=1)
    stub(alone, b, w)
    own = select(WindowKV(window=w, task="localization", size=4, group=1).score(alone), counts, alone.valid)
    assert not torch.equal(own, keep0)  # without sharing, layer 1's own attention picks other windows


def test_windowkv_generate(tiny_model):
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (2, 50))
    cache = CompressedCache(tiny_model, "windowkv:window=4,size=4", ratio=0.5)
    out = tiny_model.generate(ids, past_key_values=cache, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 53)
    keeps = [layer.kept_lengths() for layer in cache.layers]
    assert all((k == 25 + 2).all() for k in keeps)
