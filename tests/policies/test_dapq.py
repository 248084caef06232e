"""DapQ: pseudo queries at the positions after the context (RoPE at future positions) replace the observation
window; the kept set is the SnapKV rule applied to their attention."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kvsqueeze import CompressedCache
from kvsqueeze.core.context import LayerContext
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policies.base import select
from kvsqueeze.policies.dapq import DapQ, rope_frequencies, shift_rope
from kvsqueeze.policies.snapkv import SnapKV

D = 16
CONFIG = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=D, rope_theta=10000.0)


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """transformers' own RoPE of ``x [B, H, L, D]`` at ``positions [B, L]``."""
    cos, sin = LlamaRotaryEmbedding(CONFIG)(x, positions)
    return apply_rotary_pos_emb(x, x, cos, sin)[0]


def test_shift_equals_rope_at_future_positions():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, D, generator=g, dtype=torch.float64).float()
    pos = torch.arange(40, 45)[None]
    shifted = shift_rope(rope(q, pos), 37, rope_frequencies(CONFIG, D))
    assert torch.allclose(shifted, rope(q, pos + 37), atol=1e-5)


def test_kept_set_is_snapkv_rule_over_future_position_queries():
    L, w, Hq, H = 48, 4, 2, 1
    g = torch.Generator().manual_seed(4)
    pre_k = torch.randn(1, H, L, D, generator=g)
    pre_q = torch.randn(1, Hq, L, D, generator=g)
    pos = torch.arange(L)[None]
    keys, queries = rope(pre_k, pos), rope(pre_q, pos)
    ctx = LayerContext(0, 1, keys, keys.clone(), queries, torch.ones(1, L, dtype=torch.bool), D**-0.5)
    ctx.shared["config"] = CONFIG
    counts = torch.tensor([[12]])
    keep = select(DapQ(window=w, kernel=1, offset=3).score(ctx), counts, ctx.valid)[0, 0]
    # from scratch: the last w query contents placed at positions L+3 .. L+3+w-1, attention over every key
    future = rope(pre_q[:, :, -w:], torch.arange(L + 3, L + 3 + w)[None])
    probs = torch.softmax(future @ keys.repeat_interleave(Hq, 1).transpose(-1, -2) * D**-0.5, -1)
    votes = probs.sum(2).mean(1)[0]  # [L]
    votes[L - w :] = float("inf")
    expected = torch.zeros(L, dtype=torch.bool)
    expected[votes.topk(12).indices] = True
    assert torch.equal(keep, expected)
    snap = select(SnapKV(window=w, kernel=1).score(ctx), counts, ctx.valid)[0, 0]
    assert not torch.equal(snap, keep)  # the real (causal, in-context) window picks differently here


def test_dapq_needs_rope_settings(make_ctx):
    with pytest.raises(KVSqueezeError, match="RoPE"):
        DapQ(window=2).score(make_ctx())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_dapq_generate(kind):
    from tests.conftest import tiny_model

    model = tiny_model(kind)
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (1, 40))
    cache = CompressedCache(model, "dapq:window=4,offset=8", ratio=0.5)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 43)
