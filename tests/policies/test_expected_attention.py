"""Expected Attention: closed-form expected attention of Gaussian future queries (RoPE applied to the statistics),
value-norm weighted; composes with budgets and codecs like any scorer."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kvsqueeze import CompressedCache
from kvsqueeze.core.context import LayerContext
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policies.base import PROTECTED
from kvsqueeze.policies.dapq import rope_frequencies
from kvsqueeze.policies.expected_attention import (
    ExpectedAttention,
    expected_log_exp,
    mean_rotation,
    pair_rotate,
    query_statistics,
    rope_angles,
    rotate_statistics,
)
from tests.conftest import tiny_model

D = 16
CONFIG = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=D, rope_theta=10000.0)
F64 = torch.finfo(torch.float64).eps
F32 = torch.finfo(torch.float32).eps  # transformers computes RoPE's cos/sin in float32


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """transformers' own RoPE of ``x [B, H, N, D]`` at ``positions [B, N]``."""
    cos, sin = LlamaRotaryEmbedding(CONFIG)(x.float(), positions)
    return apply_rotary_pos_emb(x, x, cos.to(x.dtype), sin.to(x.dtype))[0]


def gaussian(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` samples ``[n, D]`` (float64) of a random Gaussian, with its mean and covariance."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(D, generator=g, dtype=torch.float64)
    a = torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
    cov = a @ a.T + 0.1 * torch.eye(D, dtype=torch.float64)
    samples = mean + torch.randn(n, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    return samples, mean, cov


def test_closed_form_equals_monte_carlo():
    """E[exp(s q.k)] for Gaussian q: the closed form lies within 4 standard errors of a Monte-Carlo estimate."""
    n = 400_000
    samples, mean, cov = gaussian(n)
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 1, 6, D, generator=g, dtype=torch.float64)
    s = D**-0.5
    closed = expected_log_exp(mean[None, None], cov[None, None], keys, s).exp()[0, 0]  # [6]
    draws = torch.exp(s * samples @ keys[0, 0].T)  # [n, 6]
    mc, stderr = draws.mean(0), draws.std(0) / n**0.5
    assert ((closed - mc).abs() <= 4 * stderr).all(), (closed, mc, stderr)
    # without the covariance term the estimate is biased low (Jensen), by more than the sampling error
    mean_only = expected_log_exp(mean[None, None], None, keys, s).exp()[0, 0]
    assert (mc - mean_only > 4 * stderr).all()


def test_inverse_rope_recovers_pre_rope_queries():
    g = torch.Generator().manual_seed(2)
    pre = torch.randn(1, 2, 7, D, generator=g, dtype=torch.float64)
    pos = torch.arange(30, 37)[None]
    cos, sin = rope_angles(pos, rope_frequencies(CONFIG, D))
    assert torch.allclose(pair_rotate(pre, cos[:, None], sin[:, None]), rope(pre, pos), atol=100 * F32)
    back = pair_rotate(rope(pre, pos), cos[:, None], -sin[:, None])
    assert torch.allclose(back, pre, atol=100 * F32)


def test_rope_statistics_equal_statistics_of_rotated_samples():
    """For one future position the rotated statistics are the statistics of the rotated samples; over ``n``
    positions the mean is the mean of the samples rotated to uniformly drawn positions, and the covariance is the
    paper's ``R Sigma R^T`` with the averaged rotation ``R`` (the covariance of the samples mapped by ``R``)."""
    samples, _, _ = gaussian(5000, seed=3)
    inv_freq = rope_frequencies(CONFIG, D)
    x = samples[None, None]  # [1, 1, n, D]
    mean, cov = query_statistics(x, torch.ones(1, samples.shape[0], dtype=torch.bool))
    tol = 100 * F32

    start = torch.tensor([100])
    c1, s1 = mean_rotation(start, 1, inv_freq)
    m1, v1 = rotate_statistics(mean, cov, c1, s1)
    rotated = rope(x, torch.full((1, samples.shape[0]), 100))
    rm, rv = query_statistics(rotated, torch.ones(1, samples.shape[0], dtype=torch.bool))
    assert torch.allclose(m1, rm, atol=tol) and torch.allclose(v1, rv, atol=tol)

    n = 64
    cn, sn = mean_rotation(start, n, inv_freq)
    mn, vn = rotate_statistics(mean, cov, cn, sn)
    per_position = torch.stack([rope(x, torch.full((1, x.shape[2]), 100 + i)).mean(2) for i in range(n)])
    assert torch.allclose(mn, per_position.mean(0), atol=tol)
    mapped = pair_rotate(x, cn[:, None, None], sn[:, None, None])  # R applied to every sample
    _, mapped_cov = query_statistics(mapped, torch.ones(1, x.shape[2], dtype=torch.bool))
    assert torch.allclose(vn, mapped_cov, atol=tol)
    assert not torch.allclose(vn, v1, atol=1e-3)  # averaging over positions changes the statistics


def test_score_is_normalised_expected_attention_times_value_norm():
    """From scratch on one head: softmax over non-sink keys of the closed form at the future positions, times |v|."""
    L, M, sinks, future = 40, 40, 2, 16
    g = torch.Generator().manual_seed(4)
    pre_q = torch.randn(1, 2, M, D, generator=g)
    keys = rope(torch.randn(1, 1, L, D, generator=g), torch.arange(L)[None])
    values = torch.randn(1, 1, L, D, generator=g)
    queries = rope(pre_q, torch.arange(L)[None])
    ctx = LayerContext(0, 1, keys, values, queries, torch.ones(1, L, dtype=torch.bool), D**-0.5)
    ctx.shared["config"] = CONFIG
    score = ExpectedAttention(future=future, sinks=sinks).score(ctx)[0, 0]
    assert torch.isinf(score[:sinks]).all() and score[:sinks].gt(0).all()

    inv = rope_frequencies(CONFIG, D)
    expected = []
    for h in range(2):
        q = pre_q[0, h, sinks:].double()
        mu, sigma = q.mean(0), torch.cov(q.T, correction=0)
        angles = (L + torch.arange(future, dtype=torch.float64))[:, None] * inv  # [future, D/2]
        c, s = torch.cos(angles).mean(0), torch.sin(angles).mean(0)
        R = torch.zeros(D, D, dtype=torch.float64)
        half = D // 2
        idx = torch.arange(half)
        R[idx, idx], R[idx, idx + half] = c, -s
        R[idx + half, idx], R[idx + half, idx + half] = s, c
        mu, sigma = R @ mu, R @ sigma @ R.T
        k = keys[0, 0, sinks:].double()
        logit = k @ mu * D**-0.5 + 0.5 * D**-1 * ((k @ sigma) * k).sum(-1)
        expected.append(torch.softmax(logit, 0))
    want = torch.stack(expected).mean(0) * values[0, 0, sinks:].double().norm(dim=-1)
    assert torch.allclose(score[sinks:].double(), want, rtol=1e3 * torch.finfo(torch.float32).eps)


def test_value_norm_weighting_and_window(make_ctx):
    ctx = make_ctx(L=24, D=D, groups=2)
    ctx.shared["config"] = CONFIG
    plain = ExpectedAttention(value_norm=False).score(ctx)
    weighted = ExpectedAttention().score(ctx)
    finite = torch.isfinite(plain)
    assert torch.allclose(weighted[finite], plain[finite] * ctx.values.norm(dim=-1)[finite])
    windowed = ExpectedAttention(window=8).score(ctx)
    assert not torch.allclose(windowed[finite], weighted[finite])


def test_needs_rope_settings_and_enough_queries(make_ctx):
    ctx = make_ctx(L=8, D=D)
    with pytest.raises(KVSqueezeError, match="RoPE"):
        ExpectedAttention().score(ctx)
    ctx.shared["config"] = CONFIG
    with pytest.raises(KVSqueezeError, match="sink"):
        ExpectedAttention(sinks=8).score(ctx)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("spec", ["expected_attention", "expected_attention+kivi:bits=4", "expected_attention+adakv"])
def test_composes_with_budgets_and_codecs(kind, spec):
    model = tiny_model(kind)
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (1, 48))
    cache = CompressedCache(model, spec, ratio=0.5)
    cache.prefill(model, ids)
    stats = cache.stats()
    full = [i for i, layer in enumerate(cache.layers) if not layer.is_sliding]  # (sliding layers: their window)
    kept = [x for i in full for heads in stats["tokens_kept"][i] for x in heads]
    assert sum(kept) == len(kept) * 24  # the budget is met exactly (ragged for adakv)
    assert stats["cache_bytes"] < stats["full_cache_bytes"]
    out = model.generate(ids, past_key_values=cache.fork(), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 51)


def test_sinks_are_protected_in_a_padded_batch():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (2, 32), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    seen = {}

    class Spy(ExpectedAttention):
        name = "expected_attention_spy_unregistered"

        def score(self, ctx):
            out = super().score(ctx)
            seen[ctx.layer_idx] = (out, ctx.valid)
            return out

    cache = CompressedCache(model, "expected_attention", ratio=0.5)
    object.__setattr__(cache.method, "scorer", Spy())
    cache.prefill(model, ids, attention_mask=mask)
    score, valid = seen[0]
    assert (score[0, :, :4] == PROTECTED).all() and (score[1, :, 6:10] == PROTECTED).all()
    assert torch.isneginf(score[1, :, :6]).all() and valid[1, :6].logical_not().all()
