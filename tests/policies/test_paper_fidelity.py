"""The four readings settled against the papers (issue 12): KeyDiff's anchor, SnapKV's prefix-only pooling,
PyramidKV's uniform budgets for short prompts, TOVA's unprotected last token — each with its alternative."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import PROTECTED, select
from kvsqueeze.policies.pyramidkv import pyramid_budgets
from kvsqueeze.spec import parse_method


class FixedAttention(LayerContext):
    """A layer context whose window attention is given (to pin a scorer's arithmetic down exactly)."""

    attention: torch.Tensor | None = None

    def window_attention(self, window: int) -> torch.Tensor:
        return self.attention[:, :, -window:]


def _ctx(L: int, attention: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> FixedAttention:
    keys = torch.randn(1, 1, L, 4) if keys is None else keys
    ctx = FixedAttention(0, 1, keys, torch.randn_like(keys), torch.randn(1, 1, L, 4),
                         torch.ones(1, L, dtype=torch.bool), 0.5)  # fmt: skip
    ctx.attention = attention
    return ctx


def _kept(spec: str, ctx: LayerContext, keep: int) -> set[int]:
    scores = parse_method(spec).scorer.score(ctx)
    mask = select(scores, torch.full((1, 1), keep), ctx.valid)
    return set(torch.nonzero(mask[0, 0]).flatten().tolist())


def test_keydiff_anchor_is_the_mean_of_normalised_keys():
    # nine unit keys along x, one huge key along y: the raw mean points at y, the normalised mean along x
    keys = torch.zeros(1, 1, 10, 2)
    keys[0, 0, :9] = torch.tensor([1.0, 0.0]) + 0.05 * torch.randn(9, 2)
    keys[0, 0, 9] = torch.tensor([0.0, 100.0])
    ctx = _ctx(10, keys=keys)
    anchor = F.normalize(keys[0, 0], dim=-1).mean(0)
    expected = -F.cosine_similarity(keys[0, 0], anchor[None], dim=-1)
    torch.testing.assert_close(parse_method("keydiff").scorer.score(ctx)[0, 0], expected)
    assert 9 in _kept("keydiff", ctx, 1)  # the distinctive key is kept
    raw = parse_method("keydiff:anchor=raw").scorer.score(ctx)[0, 0]
    torch.testing.assert_close(raw, -F.cosine_similarity(keys[0, 0], keys[0, 0].mean(0)[None], dim=-1))
    assert 9 not in _kept("keydiff:anchor=raw", ctx, 1)  # the raw mean is pulled to the outlier: it looks common


def test_snapkv_pools_the_prefix_only():
    L, window = 20, 4
    votes = torch.ones(L)
    votes[5], votes[15] = 3.0, 0.0  # token 5 is important; 15 sits right before a window full of votes
    votes[L - window :] = 10.0
    attention = torch.zeros(1, 1, window, L)
    attention[0, 0, 0] = votes  # votes are summed over the window's queries
    ctx = _ctx(L, attention=attention)
    scores = parse_method(f"snapkv:window={window},kernel=5").scorer.score(ctx)[0, 0]
    prefix = votes[: L - window]
    padded = F.pad(prefix, (2, 2))
    expected = torch.stack([padded[i : i + 5].sum() / 5 for i in range(L - window)])  # zero padding counted
    torch.testing.assert_close(scores[: L - window], expected)
    assert (scores[L - window :] == PROTECTED).all()
    # pooled over the window too, token 15 would score (1 + 1 + 0 + 10 + 10) / 5 = 4.4 and beat token 5
    assert _kept(f"snapkv:window={window},kernel=5", ctx, window + 1) == {5, *range(L - window, L)}


def test_pyramidkv_short_prompt_falls_back_to_uniform_budgets_as_the_reference_does():
    # 8 layers, keep 100 (protected 20): free budget 80; prompts below 2 * 80 = 160 tokens get uniform budgets
    assert pyramid_budgets(8, 100, 20, 150, beta=20.0) == [100] * 8
    long = pyramid_budgets(8, 100, 20, 1000, beta=20.0)
    assert sum(long) == 800 and long[0] > long[-1] and long == sorted(long, reverse=True)
    assert long[0] - 20 == round(2 * 80 - 80 / 20) and long[-1] - 20 == round(80 / 20)
    # just above the threshold the bottom layer would exceed the prefix: it takes the whole prefix, the top 2k - n
    edge = pyramid_budgets(8, 100, 20, 170, beta=20.0)
    assert edge[0] == 170 and edge[-1] == 20 + (160 - 150) and sum(edge) == 800
    short = pyramid_budgets(8, 100, 20, 150, beta=20.0, short_prompt="pyramid")  # the alternative reading
    assert sum(short) == 800 and short[0] > short[-1] and max(short) <= 150


def test_pyramidkv_short_prompt_parameter_is_a_spec_option():
    assert parse_method("snapkv+pyramidkv").budget.short_prompt == "uniform"
    assert parse_method("snapkv+pyramidkv:short_prompt=pyramid").budget.short_prompt == "pyramid"


def test_tova_lets_the_last_token_compete_unless_protected():
    L = 12
    last = torch.linspace(1.0, 2.0, L)
    last[-1] = 0.01  # the last query barely attends to itself
    attention = (last / last.sum()).view(1, 1, 1, L).expand(1, 2, 1, L).contiguous()
    ctx = _ctx(L, attention=attention)
    assert L - 1 not in _kept("tova", ctx, 4)  # the paper: lowest attention, dropped
    assert _kept("tova:protect_last=true", ctx, 4) == {L - 1, L - 2, L - 3, L - 4}
    assert parse_method("tova:protect_last=true").scorer.protected(L) == 1


@pytest.mark.parametrize("spec", ["keydiff", "keydiff:anchor=raw", "tova", "tova:protect_last=true", "snapkv"])
def test_readings_run_end_to_end(llama, spec):
    from kvsqueeze.core.cache import CompressedCache

    cache = CompressedCache(llama, spec, ratio=0.5)
    ids = torch.randint(3, 120, (1, 80))
    out = llama.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=3,
                         do_sample=False)  # fmt: skip
    assert out.shape[-1] == 83 and cache.stats()["cache_bytes"] < cache.stats()["full_cache_bytes"]
