"""ActQKV: the activation-bias indicator picks the deviating token as the window's probe and its best-matching keys as
representatives; the dynamic cut-off fetches fewer windows for peaked scores than for flat ones; every window is exact
attention; the hot budget as the cache reports it."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import parse_method
from kvsqueeze.retrieval.actqkv import ActQKVBlock, activation_bias, cutoff
from tests.retrieval.helpers import context, ragged, reference, tolerance

LENGTHS = [[37, 50], [64, 9]]
DIM = 16


def encode(spec, keys, values, lengths, queries=None, keep=None) -> ActQKVBlock:
    ctx = context(keys, lengths, keep)
    ctx.queries = queries
    return parse_method(spec).codec.encode(keys, values, lengths, ctx)


def test_activation_bias_is_the_distance_from_the_window_mean():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 8, DIM, generator=g)  # [windows, G, n, D]
    present = torch.ones(3, 8, dtype=torch.bool)
    present[2, 5:] = False
    got = activation_bias(q, present)
    for w in range(3):
        n = int(present[w].sum())
        mean = q[w, :, :n].mean(1, keepdim=True)
        torch.testing.assert_close(got[w, :n], (q[w, :, :n] - mean).pow(2).sum(-1).sum(0))
    assert torch.isinf(got[2, 5:]).all()


def test_the_probe_is_the_deviating_token_and_picks_the_keys_it_matches():
    """One token per window whose queries stand out is the window's probe; the keys it scores highest stay hot."""
    lengths = torch.tensor([[32]])
    keys, values, _ = ragged([[32]], dim=DIM, seed=1)
    g = torch.Generator().manual_seed(2)
    q = 0.1 * torch.randn(1, 2, 32, DIM, generator=g) + torch.randn(DIM, generator=g)  # [B, Hq=2, L, D]
    anchors, matched = {0: 5, 1: 11}, {0: 9, 1: 2}  # window -> token (within the window of 16)
    for w, t in anchors.items():
        direction = torch.randn(DIM, generator=g)
        q[0, :, 16 * w + t] += 5 * direction
        keys[16 * w + matched[w]] = 4 * direction / direction.norm() * keys.norm(dim=-1).max()
    block = encode("actqkv:window=16,reps=1", keys, values, lengths, queries=q)
    for w in anchors:
        k = keys[16 * w + matched[w]]
        assert torch.equal(block.reps[0, 0, w, 0], k), w  # the probe's best key is the representative
    # and the indicator itself chose the planted tokens
    qp = q.view(1, 1, 2, 2, 16, DIM).permute(0, 1, 3, 2, 4, 5)  # [B, H, P, G, c, D]
    bias = activation_bias(qp, torch.ones(1, 1, 2, 16, dtype=torch.bool))
    assert bias.argmax(-1).flatten().tolist() == [anchors[0], anchors[1]]


def test_window_scores_are_the_best_representative():
    keys, values, lengths = ragged(LENGTHS, dim=DIM, seed=3)
    q = torch.randn(2, 4, 64, DIM, generator=torch.Generator().manual_seed(4))
    block = encode("actqkv:window=8,reps=3", keys, values, lengths, queries=q)
    qd = torch.randn(2, 2, 3, DIM, generator=torch.Generator().manual_seed(5))
    got = block.window_scores(qd)
    for b in range(2):
        for h in range(2):
            for p in range(int((LENGTHS[b][h] + 7) // 8)):
                reps = block.reps[b, h, p][block.rep_ok[b, h, p]]
                torch.testing.assert_close(got[b, h, p], (qd[b, h] @ reps.T).max())


def test_cutoff_fetches_fewer_windows_for_peaked_scores_than_for_flat_ones():
    flat = torch.zeros(1, 2, 20)
    peaked = torch.zeros(1, 2, 20)
    peaked[..., 7] = 30.0
    assert cutoff(flat, 1.0, 10, 1).item() == 10
    assert cutoff(peaked, 1.0, 10, 1).item() == 1
    mid = torch.linspace(0, 4, 20).expand(1, 2, 20)
    assert 1 < cutoff(mid, 1.0, 10, 1).item() < 10
    assert cutoff(peaked, 1.0, 10, 3).item() == 3  # at least ``least``
    empty = torch.full((1, 2, 20), float("-inf"))
    empty[..., 0] = 1.0
    assert cutoff(empty, 1.0, 10, 1).item() == 1  # one window: nothing to spread over


def test_blocks_fetch_by_the_cut_off():
    """The same block fetches fewer windows for a query that one window matches than for a diffuse one."""
    keys, values, lengths = ragged([[96, 96]], dim=DIM, seed=6)
    g = torch.Generator().manual_seed(7)
    sharp = torch.randn(1, 2, 1, DIM, generator=g)
    keys[40] = 8 * sharp[0, 0, 0] / sharp[0, 0, 0].norm() * keys.norm(dim=-1).max()
    keys[96 + 70] = 8 * sharp[0, 1, 0] / sharp[0, 1, 0].norm() * keys.norm(dim=-1).max()
    block = encode("actqkv:window=8,reps=2,fetch=64", keys, values, lengths)  # no queries: largest keys as reps
    assert block.pages_per_step == 8
    _, used_sharp, keep_sharp = block.select(sharp, 1.0)
    _, used_flat, keep_flat = block.select(torch.zeros_like(sharp), 1.0)
    assert keep_sharp.item() < keep_flat.item() == 8
    assert used_sharp.sum() < used_flat.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_window_is_exact_attention(dtype):
    keys, values, lengths = ragged(LENGTHS, dim=DIM, dtype=dtype, seed=8)
    q = torch.randn(2, 4, 64, DIM, generator=torch.Generator().manual_seed(9)).to(dtype)
    block = encode("actqkv:window=8,least=1000", keys, values, lengths, queries=q)
    qd = torch.randn(2, 2, 3, DIM, generator=torch.Generator().manual_seed(10)).to(dtype)
    out, lse = block.attend(qd, 0.25)
    ref, ref_lse = reference(qd, keys, values, lengths, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=tolerance(dtype), rtol=tolerance(dtype))
    torch.testing.assert_close(lse.double(), ref_lse, atol=tolerance(dtype), rtol=tolerance(dtype))
    k, v = block.materialize(dtype)
    assert torch.equal(k, keys) and torch.equal(v, values)


def test_a_cut_off_below_every_window_is_not_exact():
    keys, values, lengths = ragged(LENGTHS, dim=DIM, seed=8)
    block = encode("actqkv:window=8,fetch=8", keys, values, lengths)
    qd = torch.randn(2, 2, 3, DIM, generator=torch.Generator().manual_seed(10))
    out, _ = block.attend(qd, 0.25)
    ref, _ = reference(qd, keys, values, lengths, 0.25)
    assert (out.double() - ref).abs().max() > 1e-3
