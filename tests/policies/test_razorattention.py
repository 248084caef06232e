"""RazorAttention and retrieval-head calibration: a planted echo head is found; retrieval heads keep every
token; other heads keep sinks + recent + one compensation token = mean of what they dropped; totals exact."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvsqueeze import CompressedCache, KVSqueezeError
from kvsqueeze.calibration.heads import head_scores, load_head_scores, make_probes, retrieval_heads, save_head_scores
from kvsqueeze.policies.base import select
from kvsqueeze.policies.razorattention import RazorAttention, razor_plan


def planted_echo_model():
    """A 2-layer model whose layer 0, head 0 is an echo head by construction.

    RoPE is made negligible on dims 8..31 / 40..63 (huge theta), and head 0's query and key projections are the
    same map onto those dims, so a query matches the keys of the *same token* best, wherever it is.
    """
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=48,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        rope_theta=1e12,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval()
    attn = model.model.layers[0].self_attn
    W = torch.zeros(64, 64)
    dims = list(range(8, 32)) + list(range(40, 64))
    W[dims] = torch.randn(len(dims), 64) * 0.5
    with torch.no_grad():
        attn.q_proj.weight[:64] = W
        attn.k_proj.weight[:64] = W
    return model


def test_planted_echo_head_is_found():
    model = planted_echo_model()
    probes = make_probes(list(range(48)), n_probes=3, span=32, seed=1)
    assert all(p.shape == (64,) and (p[:32] == p[32:]).all() and len(set(p[:32].tolist())) == 32 for p in probes)
    scores = head_scores(model, probes)
    echo = torch.tensor(scores["echo"])
    assert echo.shape == (2, 2)
    assert echo[0, 0] > 0.9  # the planted head points at the previous occurrence of the current token
    assert echo.flatten().argmax() == 0
    assert echo.flatten()[1:].max() < 0.5
    mask, _ = retrieval_heads(scores, induction=0.0, echo=0.25)  # one echo head of four
    assert mask.tolist() == [[True, False], [False, False]]


def test_razor_plan_sums_exactly_and_keeps_retrieval_heads_whole():
    retrieval = torch.tensor([[True, False, False], [False, False, True], [False, False, False]])
    rank = torch.rand(3, 3)
    counts, used = razor_plan(retrieval, rank, keep=30, n=100, sinks=4)
    assert int(counts.sum()) == 3 * 3 * 30
    assert (counts[used] == 100).all()
    others = counts[~used]
    assert int(others.max() - others.min()) <= 1  # the rest is shared evenly
    # too small a budget for two whole heads: the weakest retrieval head is demoted, the total stays exact
    rank = torch.tensor([[0.9, 0, 0], [0, 0, 0.1], [0, 0, 0]])
    counts, used = razor_plan(retrieval, rank, keep=20, n=100, sinks=4)
    assert used.tolist() == [[True, False, False], [False, False, False], [False, False, False]]
    assert int(counts.sum()) == 9 * 20
    with pytest.raises(KVSqueezeError):
        razor_plan(retrieval, rank, keep=3, n=100, sinks=4)


@pytest.fixture
def calibration(tmp_path):
    path = tmp_path / "heads.json"
    # 2 layers x 2 KV heads: (layer 1, head 0) is the induction head
    save_head_scores({"induction": [[0.0, 0.1], [0.9, 0.2]], "echo": [[0.0, 0.0], [0.0, 0.0]]}, path)
    return str(path)


def test_razor_selection_and_compensation_token(make_ctx, calibration):
    scorer = RazorAttention(heads=calibration, induction=0.25, echo=0.0, sinks=2)
    L = 20
    totals = 0
    for layer in range(2):
        ctx = make_ctx(H=2, L=L, layer_idx=layer, num_layers=2)
        ctx.keep = torch.tensor([10])
        scores = scorer.score(ctx)
        counts = scorer.counts(scores, ctx.keep, ctx)
        totals += int(counts.sum())
        keep = select(scores, counts, ctx.valid)
        merged = scorer.merge(ctx, keep)
        assert merged is not None
        keys, values = merged
        for h in range(2):
            c = int(counts[0, h])
            if layer == 1 and h == 0:  # retrieval head: everything, untouched
                assert c == L and keep[0, h].all()
                assert torch.equal(keys[0, h], ctx.keys[0, h])
                continue
            expect = torch.zeros(L, dtype=torch.bool)
            expect[:2] = True  # sinks
            expect[L - (c - 2) :] = True  # recent window incl. the compensation slot
            assert torch.equal(keep[0, h], expect)
            slot = L - (c - 2)
            folded = torch.zeros(L, dtype=torch.bool)
            folded[2 : slot + 1] = True  # dropped tokens + the slot's own token
            torch.testing.assert_close(keys[0, h, slot], ctx.keys[0, h, folded].mean(0))
            torch.testing.assert_close(values[0, h, slot], ctx.values[0, h, folded].mean(0))
            others = torch.ones(L, dtype=torch.bool)
            others[slot] = False
            assert torch.equal(keys[0, h, others], ctx.keys[0, h, others])
    assert totals == 2 * 2 * 10  # 20 for the retrieval head, the other three share 20: 7, 7, 6


def test_razor_generate_end_to_end(tiny_model, calibration):
    torch.manual_seed(4)
    ids = torch.randint(0, 128, (1, 40))
    cache = CompressedCache(tiny_model, f"razorattention:heads={calibration},induction=0.25,echo=0", ratio=0.5)
    out = tiny_model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 44)
    kept = [layer.kept_lengths()[0].tolist() for layer in cache.layers]
    assert kept[1][0] == 40 + 3  # the retrieval head kept its whole context (+ 3 decoded tokens)
    assert sum(sum(x) for x in kept) - 4 * 3 == 2 * 2 * 20


def test_missing_calibration_is_one_line_error(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path))
    with pytest.raises(KVSqueezeError, match="calibrate heads"):
        load_head_scores("no-such-model")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"induction": [[0.1]], "echo": [[0.0]]}))
    cache = CompressedCache(tiny_model, f"razorattention:heads={bad}", ratio=0.5)
    with pytest.raises(KVSqueezeError, match="calibrate this model"):
        cache.prefill(tiny_model, torch.randint(0, 128, (1, 20)))
