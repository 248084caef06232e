"""Each eviction scorer keeps exactly what its paper's rule selects (hand-made inputs, reference math by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import select, tokens_to_keep
from kvsqueeze.spec import parse_method

B, H, G, L, D = 2, 2, 2, 40, 8


def make_ctx(seed: int = 0, valid: torch.Tensor | None = None, keep: int = 16) -> LayerContext:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, L, D, generator=gen) * torch.linspace(0.2, 3.0, L)[None, None, :, None]
    values = torch.randn(B, H, L, D, generator=gen)
    queries = torch.randn(B, H * G, L, D, generator=gen)
    return LayerContext(
        layer_idx=0,
        num_layers=2,
        keys=keys,
        values=values,
        queries=queries,
        valid=torch.ones(B, L, dtype=torch.bool) if valid is None else valid,
        scaling=D**-0.5,
        keep=torch.full((B,), keep),
    )


def kept(spec: str, ctx: LayerContext, keep: int = 16) -> torch.Tensor:
    scorer = parse_method(spec).scorer
    counts = torch.full((B, H), keep)
    return select(scorer.score(ctx), counts, ctx.valid)


def as_sets(mask: torch.Tensor) -> list[list[set[int]]]:
    return [[set(torch.nonzero(mask[b, h]).flatten().tolist()) for h in range(mask.shape[1])] for b in range(B)]


def attention_rows(ctx: LayerContext) -> torch.Tensor:
    """Full causal softmax attention [B, Hq, L, L], computed naively."""
    keys = ctx.keys.repeat_interleave(G, dim=1)
    logits = ctx.queries @ keys.transpose(-1, -2) * ctx.scaling
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    logits = logits.masked_fill(~causal, float("-inf"))
    return logits.softmax(-1)


def test_streaming_llm_keeps_sinks_and_recent_window():
    mask = kept("streaming_llm:sinks=4", make_ctx())
    expected = set(range(4)) | set(range(L - 12, L))
    assert all(s == expected for row in as_sets(mask) for s in row)


def test_streaming_llm_sinks_skip_left_padding():
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, :10] = False
    mask = kept("streaming_llm:sinks=2", make_ctx(valid=valid))
    assert as_sets(mask)[1][0] == {10, 11} | set(range(L - 14, L))


def test_snapkv_keeps_window_plus_topk_of_pooled_window_votes():
    ctx = make_ctx(1)
    window, kernel, keep = 8, 3, 16
    mask = kept(f"snapkv:window={window},kernel={kernel}", ctx, keep)
    probs = attention_rows(ctx)[:, :, -window:]  # [B, Hq, w, L]
    votes = probs.sum(2).view(B, H, G, L).mean(2)
    for b in range(B):
        for h in range(H):
            v = votes[b, h]
            pooled = torch.tensor(
                [v[max(0, i - 1) : min(L, i + 2)].mean().item() for i in range(L)]
            )  # avg pooling, kernel 3, no padding counted
            prefix = pooled[: L - window]
            top = set(torch.topk(prefix, keep - window).indices.tolist())
            assert as_sets(mask)[b][h] == top | set(range(L - window, L))


def test_h2o_keeps_recent_half_and_heavy_hitters_of_accumulated_attention():
    ctx = make_ctx(2)
    keep = 16
    mask = kept("h2o:recent_fraction=0.5", ctx, keep)
    acc = attention_rows(ctx).sum(2).view(B, H, G, L).mean(2)  # column sums
    recent = set(range(L - keep // 2, L))
    for b in range(B):
        for h in range(H):
            scores = acc[b, h].clone()
            scores[list(recent)] = -1
            heavy = set(torch.topk(scores, keep - len(recent)).indices.tolist())
            assert as_sets(mask)[b][h] == heavy | recent


def test_tova_uses_last_query_attention_averaged_over_all_heads():
    ctx = make_ctx(3)
    mask = kept("tova", ctx, 10)
    last = attention_rows(ctx)[:, :, -1].mean(1)  # [B, L]
    for b in range(B):
        top = set(torch.topk(last[b], 10).indices.tolist())
        assert as_sets(mask)[b][0] == top == as_sets(mask)[b][1]


def test_knorm_keeps_lowest_key_norms():
    ctx = make_ctx(4)
    mask = kept("knorm", ctx, 12)
    norms = ctx.keys.norm(dim=-1)
    for b in range(B):
        for h in range(H):
            assert as_sets(mask)[b][h] == set(torch.topk(-norms[b, h], 12).indices.tolist())


def test_keydiff_keeps_keys_least_similar_to_mean_key():
    ctx = make_ctx(5)
    mask = kept("keydiff", ctx, 12)
    for b in range(B):
        for h in range(H):
            k = ctx.keys[b, h]
            anchor = (k / k.norm(dim=-1, keepdim=True)).mean(0)  # the paper's anchor: mean of normalised keys
            cos = (k @ anchor) / (k.norm(dim=-1) * anchor.norm())
            assert as_sets(mask)[b][h] == set(torch.topk(-cos, 12).indices.tolist())


def test_random_is_seeded():
    ctx = make_ctx(6)
    a, b = kept("random:seed=1", ctx), kept("random:seed=1", ctx)
    c = kept("random:seed=2", ctx)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_padding_is_never_selected():
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[0, :25] = False
    mask = kept("knorm", make_ctx(7, valid=valid), 30)  # asks for more than the row's 15 real tokens
    assert not mask[0, :, :25].any()
    assert mask[0].sum(-1).tolist() == [15, 15]


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9, 0.999])
def test_tokens_to_keep_follows_ratio_and_never_drops_to_zero(ratio):
    lengths = torch.tensor([1, 7, 100, 2048])
    keep = tokens_to_keep(lengths, ratio, None)
    assert keep.tolist() == [max(1, math.ceil(n * (1 - ratio) - 1e-9)) for n in lengths.tolist()]
    assert tokens_to_keep(lengths, None, 50).tolist() == [1, 7, 50, 50]
