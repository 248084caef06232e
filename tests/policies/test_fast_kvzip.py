"""Fast KVzip: the sink-attention gate, training only the gates on KVzip targets of a frozen model, saving and
loading per model, and the gate scorer (sinks + recent window kept, joint ranking) on hidden states captured with
forward hooks."""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from kvsqueeze import CompressedCache
from kvsqueeze.core.context import SCRATCH, LayerContext
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policies.base import PROTECTED
from kvsqueeze.policies.fast_kvzip import (
    FAST_KVZIP_SCORES,
    GATE_SCORES,
    FastKVzip,
    GateData,
    Gates,
    SinkGate,
    capture_hidden,
    gate_data,
    gates_file,
    load_gates,
    rank_correlation,
    save_gates,
    spearman,
    split_every,
    step_schedule,
    train_gates,
)
from kvsqueeze.policies.kvzip import RepeatPrompt, global_counts
from tests.conftest import tiny_model

PROMPT = RepeatPrompt(torch.tensor([[3, 4, 5]]), torch.tensor([[6, 7]]), torch.tensor([[8, 9]]))
EPS32 = torch.finfo(torch.float32).eps


def context(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(10, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_gate_is_the_softmax_weight_of_the_own_key_among_sinks():
    torch.manual_seed(0)
    gate = SinkGate(hidden=12, kv_heads=2, groups=3, dim=4, sinks=5)
    with torch.no_grad():
        gate.sink_keys.normal_()
        gate.bias.normal_()
    h = torch.randn(1, 7, 12)
    got = gate(h)  # [1, 2, 7]
    q = gate.q_norm(gate.q_proj(h).view(1, 7, 2, 3, 4))
    k = gate.k_norm(gate.k_proj(h).view(1, 7, 2, 4))
    want = torch.zeros(1, 2, 7)
    for t in range(7):
        for head in range(2):
            for g in range(3):
                own = q[0, t, head, g] @ k[0, t, head] / 2 + gate.bias[head, g]
                sinks = gate.sink_keys[head] @ q[0, t, head, g] / 2
                want[0, head, t] += torch.softmax(torch.cat([own[None], sinks]), 0)[0] / 3
    assert torch.allclose(got, want, atol=16 * EPS32)
    assert ((got > 0) & (got < 1)).all()


def test_training_recovers_a_realisable_target():
    """Targets produced by a teacher gate: training only the student's parameters reaches a high rank correlation."""
    torch.manual_seed(1)
    teacher = Gates([0, 1], hidden=16, kv_heads=2, groups=2, dim=4, sinks=3)
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_()
    hidden = {i: torch.randn(3000, 16) for i in (0, 1)}
    with torch.no_grad():
        targets = {i: teacher[i](h[None])[0] for i, h in hidden.items()}
    train, test = split_every(GateData(hidden, targets), every=5)
    student = Gates([0, 1], hidden=16, kv_heads=2, groups=2, dim=4, sinks=3)
    before = rank_correlation(student, test)
    losses = train_gates(student, train, steps=400, batch=500, lr=0.2)
    after = rank_correlation(student, test)
    assert losses[-1] < losses[0] and after > 0.8 > before + 0.3


def test_frozen_model_is_untouched_and_gates_learn_kvzip_targets():
    model = tiny_model("llama")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    data = gate_data(model, [context(120, seed=s) for s in range(3)], PROMPT, start=2)
    assert data.tokens == 3 * 118 and data.hidden[0].shape == (354, 64) and data.targets[1].shape == (2, 354)
    gates = Gates.for_model(model.config)
    losses = train_gates(gates, data, steps=60, batch=100)
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all(p.grad is None for p in model.parameters())


def test_schedule_and_spearman():
    assert [step_schedule(s, 1000) for s in (0, 9, 10, 499, 500, 750)] == [0.1, 1.0, 1.0, 1.0, 0.5, 0.25]
    x = torch.tensor([[0.1, 0.5, 0.3, 0.9]])
    assert math.isclose(float(spearman(x, x**3)), 1.0) and math.isclose(float(spearman(x, -x)), -1.0)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(2)
    gates = Gates([1, 3], hidden=8, kv_heads=1, groups=2, dim=4, sinks=2)
    h = torch.randn(1, 5, 8)
    path = save_gates(gates, tmp_path / "g.safetensors", heldout_spearman=0.5)
    loaded, meta = load_gates(path)
    assert loaded.layers == [1, 3] and meta["heldout_spearman"] == 0.5
    assert torch.equal(loaded[3](h), gates[3](h))
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(KVSqueezeError, match="not a fast_kvzip gate file"):
        load_gates(tmp_path / "bad.safetensors")
    with pytest.raises(KVSqueezeError, match="calibrate_fast_kvzip"):
        load_gates(tmp_path / "missing.safetensors")


def test_gates_are_cached_per_model(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path))
    a, b = tiny_model("llama").config, tiny_model("qwen2").config
    assert gates_file(a) != gates_file(b) and gates_file(a).is_relative_to(tmp_path)


def test_capture_hidden_reads_the_attention_input():
    model = tiny_model("llama")
    ids = context(20, seed=3)
    hidden = capture_hidden(model, ids)
    out = model(input_ids=ids, output_hidden_states=True)
    normed = model.model.layers[1].input_layernorm(out.hidden_states[1])  # layer 1's attention input
    assert set(hidden) == {0, 1} and torch.allclose(hidden[1], normed, atol=16 * EPS32)


def test_window_follows_the_paper():
    scorer = FastKVzip()
    assert scorer.recent(2000) == 40 and scorer.recent(20000) == 4096 and scorer.protected(2000) == 44


@pytest.fixture
def gates_path(tmp_path):
    """Random gates of the tiny Llama (the scorer's wiring does not depend on what they learned)."""
    torch.manual_seed(5)
    gates = Gates.for_model(tiny_model("llama").config)
    return save_gates(gates, tmp_path / "gates.safetensors"), gates


def test_scorer_on_given_gate_scores_layer_allocation():
    """Sinks and the recent window are protected, the rest are the gate's scores; ``allocation=layer`` ranks the
    layer's heads jointly."""
    model = tiny_model("llama")
    ids = context(100, seed=4)
    hidden = capture_hidden(model, ids)
    torch.manual_seed(5)
    gates = Gates.for_model(model.config)
    keys = torch.zeros(1, 2, 100, 16)
    ctx = LayerContext(1, 2, keys, keys, None, torch.ones(1, 100, dtype=torch.bool), 0.25)
    ctx.shared[FAST_KVZIP_SCORES] = gates.scores(hidden)
    scorer = FastKVzip(allocation="layer", window_ratio=0.05)
    score = scorer.score(ctx)
    assert (score[..., :4] == PROTECTED).all() and (score[..., -5:] == PROTECTED).all()
    assert torch.allclose(score[..., 4:-5], gates[1](hidden[1])[..., 4:-5])
    counts = scorer.counts(score, torch.tensor([30]), ctx)
    assert counts.sum() == 60 and torch.equal(counts, global_counts(score[None], torch.tensor([30]))[0])


def test_missing_gates_are_refused_before_any_model_work(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(KVSqueezeError, match="calibrate_fast_kvzip"):
        CompressedCache(model, f"fast_kvzip:gates={tmp_path / 'none.safetensors'}", ratio=0.5)


@pytest.mark.parametrize("spec", ["fast_kvzip", "fast_kvzip+kivi:bits=4"])
def test_gates_score_the_hidden_states_of_the_live_forward(gates_path, spec, monkeypatch):
    """The cache's hooks run the gates on the hidden states entering each attention layer during the prefill (the
    same as on hidden states captured alone, to float32 rounding), every layer is compressed with the paper's joint
    ranking of those scores, and the hooks leave with the cache."""
    path, gates = gates_path
    model = tiny_model("llama")
    ids = context(60, seed=6)
    seen = {}
    prepare = FastKVzip.prepare

    def spy(self, host):
        seen.update(host.shared_state[SCRATCH][GATE_SCORES])
        prepare(self, host)

    monkeypatch.setattr(FastKVzip, "prepare", spy)
    cache = CompressedCache(model, spec.replace("fast_kvzip", f"fast_kvzip:gates={path}"), ratio=0.5)
    cache.prefill(model, ids)
    alone = gates.scores(capture_hidden(model, ids))
    assert all(torch.allclose(seen[i], alone[i], atol=4 * EPS32, rtol=4 * EPS32) for i in (0, 1))
    stacked = torch.stack([FastKVzip()._finish(seen[i], torch.ones(1, 60, dtype=torch.bool)) for i in (0, 1)])
    want = global_counts(stacked, torch.tensor([30]))[:, 0].tolist()
    kept = cache.stats()["tokens_kept"]
    assert [kept[i][0] for i in (0, 1)] == want and sum(map(sum, want)) == 2 * 2 * 30
    assert set(cache.shared_state) == {"config"}  # nothing of the scoring stays
    out = model.generate(ids, past_key_values=cache.fork(), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 63)
    gone = weakref.ref(cache)
    del cache
    assert gone() is None and not any(m._forward_pre_hooks for m in model.modules())
