"""MiniCache merge math: magnitudes preserved, exact for identical layers, distinct tokens retained exactly."""

from __future__ import annotations

import torch

from kvsqueeze.policies.minicache import merge_pair, restore, slerp


def test_identical_layers_are_restored_exactly():
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(0))
    pair = merge_pair(x, x.clone())
    assert torch.allclose(restore(pair, "a"), x, atol=1e-5)
    assert torch.allclose(restore(pair, "b"), x, atol=1e-5)


def test_magnitudes_are_preserved_and_direction_is_the_slerp_midpoint():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(30, 8, generator=gen) * 3, torch.randn(30, 8, generator=gen)
    pair = merge_pair(a, b, t=0.5)
    assert torch.allclose(restore(pair, "a").norm(dim=-1), a.norm(dim=-1), atol=1e-5)
    assert torch.allclose(restore(pair, "b").norm(dim=-1), b.norm(dim=-1), atol=1e-5)
    ea, eb = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    d = pair.direction  # the midpoint is equally far (in angle) from both directions
    assert torch.allclose((d * ea).sum(-1), (d * eb).sum(-1), atol=1e-5)
    assert torch.allclose(slerp(ea, eb, 0.0), ea, atol=1e-5) and torch.allclose(slerp(ea, eb, 1.0), eb, atol=1e-5)


def test_most_distinct_tokens_are_retained_unmerged():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(10, 8, generator=gen)
    b = a + 0.01 * torch.randn(10, 8, generator=gen)
    b[7] = -a[7]  # opposite direction: the most distinct token
    pair = merge_pair(a, b, retain=0.1)
    assert pair.retained.tolist() == [7]
    assert torch.equal(restore(pair, "a")[7], a[7]) and torch.equal(restore(pair, "b")[7], b[7])
