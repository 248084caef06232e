"""CAKE: the eviction indicator (mean + γ·variance of window attention), layer preferences from dispersion and
shift, and an online cascade whose budgets sum exactly over layers."""

from __future__ import annotations

import torch

from kvsqueeze import CompressedCache
from kvsqueeze.policies.base import PROTECTED
from kvsqueeze.policies.cake import CAKE, cascade_budget, layer_preference


def _attention(w: int, L: int) -> torch.Tensor:
    att = torch.zeros(1, 1, w, L)
    att[..., 0] = 0.3  # token 0: steady importance
    att[..., 0::2, 1] = 0.5  # token 1: shifting importance (mean 0.25, high variance)
    att[..., 2:] = (1 - att[..., :2].sum(-1, keepdim=True)) / (L - 2)
    return att


def test_indicator_is_mean_plus_gamma_variance(make_ctx):
    ctx = make_ctx(H=1, L=12)
    att = _attention(4, 12)
    ctx.window_attention = lambda window: att
    steady = CAKE(window=4, kernel=1, gamma=0.0).score(ctx)[0, 0]
    shifting = CAKE(window=4, kernel=1, gamma=200.0).score(ctx)[0, 0]
    assert (steady[-4:] == PROTECTED).all()
    assert steady[0] > steady[1]  # by mean alone the steady token wins
    assert shifting[1] > shifting[0]  # the variance term keeps the shifting one
    expected = att[0, 0].mean(0) + 200.0 * att[0, 0].var(0, unbiased=False)
    torch.testing.assert_close(shifting[:8], expected[:8])


def test_preference_rewards_dispersion_and_shift():
    focused = torch.zeros(1, 1, 4, 10)
    focused[..., 0] = 1.0  # every query on one token: no dispersion, no shift
    spread = _attention(4, 10)
    assert float(layer_preference(focused, 1.0, 1.0)) == 0.0
    assert float(layer_preference(spread, 1.0, 1.0)) > 0.0


def test_cascade_sums_exactly_and_follows_preferences():
    keep, m = 100, 4
    prefs, spent, budgets = [], 0, []
    for layer, p in enumerate([1.0, 3.0, 1.0, 1.0]):
        prefs.append(p)
        b = cascade_budget(prefs, layer, m, keep, spent, lo=10, hi=400)
        budgets.append(b)
        spent += b
    assert sum(budgets) == m * keep
    assert budgets[0] == 100 and budgets[1] == round(300 * 3 / 7)  # remaining × P / (P + future × mean P)
    assert budgets[1] > budgets[2]
    # clamps keep the remaining layers feasible
    assert cascade_budget([1.0, 1000.0], 1, 3, 100, 100, lo=10, hi=150) == round(200 * 1000 / 1500.5)
    assert cascade_budget([1.0, 1000.0], 1, 3, 100, 100, lo=10, hi=120) == 120  # capped at the real tokens
    assert cascade_budget([1000.0, 1.0], 1, 3, 100, 280, lo=10, hi=150) == 10  # the last layer still gets lo


def test_cake_generate_totals(tiny_model):
    torch.manual_seed(5)
    ids = torch.randint(0, 128, (1, 48))
    cache = CompressedCache(tiny_model, "cake:window=4", ratio=0.5)
    out = tiny_model.generate(ids, past_key_values=cache, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 51)
    kept = [layer.kept_lengths() - 2 for layer in cache.layers]  # minus the 2 decoded tokens held
    assert sum(int(x.sum()) for x in kept) == 2 * 2 * 24
    assert all((x == x[0, 0]).all() for x in kept)  # one budget per layer
