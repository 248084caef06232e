"""PrefixKV: one global cumulative-importance threshold sizes every layer (concentrated layers keep fewer
tokens); sizes sum exactly; the budget composes with a scorer through generate."""

from __future__ import annotations

import torch

from kvsqueeze import CompressedCache
from kvsqueeze.calibration.heads import save_head_scores
from kvsqueeze.policies.prefixkv import prefix_sizes, retained_fraction

GRID = torch.linspace(0, 1, 101)
CONCENTRATED = 1 - (1 - GRID) ** 8  # a few tokens hold most of the attention
UNIFORM = GRID.clone()  # every token matters equally


def test_retained_fraction_reads_the_lorenz_curve():
    curves = torch.stack([CONCENTRATED, UNIFORM])
    r = retained_fraction(curves, 0.5)
    assert abs(float(r[1]) - 0.5) < 1e-6  # uniform: half the tokens hold half the mass
    expected = 1 - 0.5 ** (1 / 8)  # solve 1 - (1 - x)^8 = 0.5
    assert abs(float(r[0]) - expected) < 0.01


def test_prefix_sizes_share_one_threshold_and_sum_exactly():
    curves = torch.stack([CONCENTRATED, UNIFORM, CONCENTRATED])
    sizes = prefix_sizes(curves, free=300, cap=1000)
    assert sum(sizes) == 3 * 300
    assert sizes[1] > sizes[0] and sizes[0] == sizes[2]
    # the same threshold: the cumulative importance each layer reaches is (about) equal
    reach = [float(CONCENTRATED[round(sizes[0] / 10)]), float(UNIFORM[round(sizes[1] / 10)])]
    assert abs(reach[0] - reach[1]) < 0.03
    assert all(0 <= s <= 1000 for s in prefix_sizes(curves, free=990, cap=1000))


def test_prefixkv_generate(tiny_model, tmp_path):
    path = tmp_path / "profile.json"
    curves = torch.stack([CONCENTRATED, UNIFORM]).tolist()
    save_head_scores({"induction": [[0, 0], [0, 0]], "echo": [[0, 0], [0, 0]], "prefix_curves": curves}, path)
    torch.manual_seed(8)
    ids = torch.randint(0, 128, (1, 44))
    cache = CompressedCache(tiny_model, f"snapkv:window=4+prefixkv:profile={path}", ratio=0.5)
    out = tiny_model.generate(ids, past_key_values=cache, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 46)
    kept = [int(layer.kept_lengths()[0, 0]) - 1 for layer in cache.layers]
    assert sum(kept) == 2 * 22 and kept[0] < kept[1]  # the concentrated layer keeps fewer


def test_layer_curves_are_lorenz_curves(tiny_model):
    from kvsqueeze.calibration.heads import layer_curves

    torch.manual_seed(9)
    curves = torch.tensor(layer_curves(tiny_model, [torch.randint(0, 128, (40,))], window=4, points=11))
    assert curves.shape == (2, 11)
    assert torch.allclose(curves[:, 0], torch.zeros(2)) and torch.allclose(curves[:, -1], torch.ones(2))
    assert (curves.diff(dim=1) >= -1e-6).all()  # non-decreasing
    assert (curves[:, 5] >= 0.5 - 1e-6).all()  # sorted by importance: the top half holds at least half
