"""DefensiveKV: max-then-prior aggregation keeps a token that mattered to one query only (mean aggregation
drops it); Layer-DefensiveKV: layer budgets follow the cross-layer scores and sum exactly."""

from __future__ import annotations

import torch

from kvsqueeze import CompressedCache
from kvsqueeze.policies.base import PROTECTED, select
from kvsqueeze.policies.defensivekv import DefensiveKV, defensive_aggregate, layer_share


def test_defensive_aggregation_is_max_floored_at_mean():
    per_query = torch.zeros(1, 1, 2, 4, 6)  # [B, H, G, w, L]
    per_query[0, 0, 0, :, 0] = 0.4  # steady token
    per_query[0, 0, 1, 2, 1] = 0.9  # one query of one group head spikes on token 1
    per_query[0, 0, 0, :, 2] = 0.1
    valid = torch.ones(1, 6, dtype=torch.bool)
    agg = defensive_aggregate(per_query, valid)[0, 0]
    mean_of_max = (0.4 + 0.9 + 0.1) / 6
    torch.testing.assert_close(agg, torch.tensor([0.4, 0.9, mean_of_max, mean_of_max, mean_of_max, mean_of_max]))
    # mean aggregation would rank the spiking token below the steady one; defensive aggregation keeps it first
    assert per_query.mean(dim=(2, 3))[0, 0, 1] < per_query.mean(dim=(2, 3))[0, 0, 0]
    assert agg[1] > agg[0]


def test_defensivekv_keeps_the_spike(make_ctx):
    ctx = make_ctx(H=1, L=12, groups=1)
    att = torch.full((1, 1, 4, 12), 0.05)
    att[..., 3] = 0.2  # steady
    att[..., 1, 7] = 0.6  # one spike
    ctx.window_attention = lambda window: att
    scores = DefensiveKV(window=4, headwise=False).score(ctx)
    assert (scores[0, 0, -4:] == PROTECTED).all()
    keep = select(scores, torch.tensor([[6]]), ctx.valid)[0, 0]
    assert keep[7] and keep[3]


def test_layer_share_sums_exactly_and_follows_scores():
    torch.manual_seed(0)
    layers = [torch.rand(40) * s for s in (1.0, 5.0, 0.2, 1.0)]  # layer 1 has the strongest scores
    spent, shares, seen = 0, [], []
    for i, scores in enumerate(layers):
        seen.append(scores)
        share = layer_share(seen, spent, i, 4, keep_total=20, lo=4, hi=44)
        shares.append(share)
        spent += share
    assert sum(shares) == 4 * 20
    assert shares[1] > shares[2] and shares[1] > 20
    assert all(4 <= s <= 44 for s in shares)


def test_generate_defensive_variants(tiny_model):
    torch.manual_seed(6)
    ids = torch.randint(0, 128, (2, 48))
    for method in ("defensivekv:window=4", "layer_defensivekv:window=4"):
        cache = CompressedCache(tiny_model, method, ratio=0.5)
        out = tiny_model.generate(ids, past_key_values=cache, max_new_tokens=3, do_sample=False)
        assert out.shape == (2, 51)
        total = sum(layer.kept_lengths() - 2 for layer in cache.layers).sum(-1)  # per row, minus decoded tokens
        assert total.tolist() == [2 * 2 * 24, 2 * 2 * 24]


def test_layer_share_respects_the_safeguard_floor():
    torch.manual_seed(1)
    layers = [torch.rand(40) * s for s in (5.0, 0.01, 5.0, 5.0)]  # layer 1 is weak next to layer 0

    def run(floor):
        spent, shares, seen = 0, [], []
        for i, scores in enumerate(layers):
            seen.append(scores)
            share = layer_share(seen, spent, i, 4, keep_total=20, lo=4, hi=44, floor=floor)
            shares.append(share)
            spent += share
        return shares

    assert run(0)[1] < 8  # without the floor the weak layer keeps little more than its protected tokens
    shares = run(8)
    assert sum(shares) == 80 and min(shares) >= 8


def test_tie_break_orders_tokens_at_the_prior_by_their_mean():
    per_query = torch.zeros(1, 1, 1, 4, 5)
    per_query[..., 0] = 1.0  # far above the mean
    per_query[..., 0:2, 1] = 0.05  # below the mean, attended twice
    per_query[..., 0:1, 2] = 0.05  # below the mean, attended once (same max as token 1)
    valid = torch.ones(1, 5, dtype=torch.bool)
    plain = defensive_aggregate(per_query, valid)[0, 0]
    assert plain[1] == plain[2]  # the floor ties them
    ordered = defensive_aggregate(per_query, valid, tie_break=1e-3)[0, 0]
    assert ordered[0] > ordered[1] > ordered[2] > ordered[3]
