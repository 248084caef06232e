"""Decoding schedules: the budget bound at every generation step, and each schedule's own rule on hand-made inputs."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.context import AttentionCall
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.schedules.lazyeviction import fold_activations
from kvsqueeze.schedules.triattention import rope_inv_freq, to_pre_rope, trig_scores
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


class MaxHeld(StoppingCriteria):
    """Records the most tokens any (layer, row, head) holds after every forward pass."""

    def __init__(self, cache):
        self.cache, self.held = cache, []

    def __call__(self, input_ids, scores, **kwargs):
        kept = self.cache.stats()["tokens_kept"].values()
        self.held.append(max(x for rows in kept for heads in rows for x in heads))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


SPECS = [
    ("h2o+interval:every=4,budget=16", 16, 4),
    ("snapkv:window=4+interval:every=5,budget=12", 12, 5),
    ("streaming_llm+interval:every=1,budget=10", 10, 1),
    ("lazyeviction:budget=16,window=4", 16, 4),
    ("triattention:budget=16,every=4", 16, 4),
]


@pytest.mark.parametrize(("spec", "budget", "every"), SPECS)
def test_bound_respected_at_every_generation_step(model, spec, budget, every):
    cache = CompressedCache(model, spec)
    watch = MaxHeld(cache)
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # a left-padded row: fewer real tokens
    out = model.generate(
        ids, attention_mask=mask, past_key_values=cache, max_new_tokens=40, do_sample=False, stopping_criteria=[watch]
    )
    assert out.shape[1] == 70
    assert len(watch.held) == 40
    assert max(watch.held) <= budget + every - 1
    assert min(watch.held) >= budget  # it compresses to the budget, not below
    assert cache.layers[0].seen == 69  # the logical length transformers sees (RoPE positions unshifted)


def test_interval_needs_a_budget(model):
    cache = CompressedCache(model, "h2o+interval")
    with pytest.raises(KVSqueezeError, match="budget"):
        model.generate(torch.ones(1, 8, dtype=torch.long), past_key_values=cache, max_new_tokens=2)


def test_interval_streaming_keeps_sinks_and_the_most_recent_tokens(model):
    cache = CompressedCache(model, "streaming_llm:sinks=2+interval:every=3,budget=10")
    model.generate(torch.randint(0, 128, (1, 20)), past_key_values=cache, max_new_tokens=25, do_sample=False)
    layer = cache.layers[1]
    seen = layer.seen  # 44 tokens seen; compressed at 47-3… the last compression kept sinks + 8 most recent
    pos = layer.state["pos"][0, 0].tolist()
    n = len(pos)
    assert pos[:2] == [0, 1]
    assert pos[2:] == list(range(seen - (n - 2), seen))


# ---- hand-made drives: keys/queries chosen by hand, fed through the real decode step ----------------------
def drive(model, spec: str, keys: torch.Tensor, queries: torch.Tensor, prompt: int) -> CompressedCache:
    """Feed ``keys [1, H, N, D]`` (values = keys) and ``queries [1, Hq, N, D]`` to layer 0 token by token."""
    cache = CompressedCache(model, spec)
    layer, module = cache.layers[0], model.model.layers[0].self_attn
    schedule = cache.method.schedule
    D = keys.shape[-1]
    N = keys.shape[2]
    steps = [(0, prompt)] + [(t, t + 1) for t in range(prompt, N)]
    for a, b in steps:
        layer.update(keys[:, :, a:b], keys[:, :, a:b])
        call = AttentionCall(module, queries[:, :, a:b], None, D**-0.5, torch.arange(a, b)[None])
        schedule.after_attention(cache, layer, call)
    return cache


def test_interval_h2o_keeps_the_heavy_hitter_through_every_recompression(model):
    H, G, D, N = 2, 2, 16, 60
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, H, N, D, generator=gen) * 0.1
    keys[:, :, 5] = 0.0
    keys[:, :, 5, 0] = 8.0  # token 5: every query below looks at it
    queries = torch.randn(1, H * G, N, D, generator=gen) * 0.1
    queries[..., 0] = 3.0
    cache = drive(model, "h2o:recent_fraction=0.5+interval:every=4,budget=8", keys, queries, prompt=12)
    pos = cache.layers[0].state["pos"][0]
    assert all(5 in pos[h].tolist() for h in range(H))
    assert all(pos[h, -4:].tolist() == list(range(N - 4, N)) for h in range(H))  # recent half of the budget
    acc = cache.layers[0].state["acc"][0]
    assert all(int(acc[h].argmax()) == pos[h].tolist().index(5) for h in range(H))


def test_lazyeviction_tracks_last_activation_and_maximum_recurrence_interval():
    last = torch.tensor([0, 1, 2])  # tokens created at steps 0, 1, 2
    mri = torch.zeros(3, dtype=torch.long)
    pattern = {5: [0], 9: [0, 1], 20: [0]}  # step -> activated tokens
    for step in range(3, 25):
        active = torch.zeros(3, dtype=torch.bool)
        active[pattern.get(step, [])] = True
        last, mri = fold_activations(active, torch.tensor(step), last, mri)
    assert last.tolist() == [20, 9, 2]
    assert mri.tolist() == [11, 8, 0]  # token 0: gaps 5, 4, 11; token 1: gap 8; token 2: never active


def test_lazyeviction_keeps_a_recurring_token_and_evicts_a_once_important_one(model):
    H, G, D, N = 2, 2, 16, 70
    keys = torch.zeros(1, H, N, D)
    keys[:, :, 3, 0] = 6.0  # recurring: channel 0
    keys[:, :, 4, 1] = 6.0  # important once: channel 1
    queries = torch.zeros(1, H * G, N, D)
    queries[:, :, 10, 1] = 3.0  # token 4 is looked at only by query 10 (in the prompt)
    queries[:, :, 10::7, 0] = 3.0  # token 3 every 7 steps
    cache = drive(model, "lazyeviction:budget=8,window=4,alpha=2.0", keys, queries, prompt=12)
    state = cache.layers[0].state
    pos = state["pos"][0, 0].tolist()
    assert 3 in pos and 4 not in pos
    i = pos.index(3)
    assert int(state["mri"][0, 0, i]) == 7
    assert pos[-4:] == list(range(N - 4, N))  # the observation window is never evicted


def test_triattention_series_is_the_exact_logit_when_queries_sit_on_their_center(model):
    """With every pre-RoPE query equal to its center, S_trig(k, d) is the post-RoPE logit at distance d
    and the norm term vanishes."""
    D = 16
    module = model.model.layers[0].self_attn
    inv_freq = rope_inv_freq(module, D)
    gen = torch.Generator().manual_seed(3)
    q_pre, k_pre = torch.randn(D, generator=gen), torch.randn(5, D, generator=gen)
    rotary = model.model.rotary_emb
    k_pos, distances = torch.tensor([0, 3, 7, 20, 40]), torch.tensor([1, 4, 9, 33, 2])
    q_pos = k_pos + distances
    cos, sin = rotary(k_pre[None], torch.cat([k_pos, q_pos])[None])
    q_rot, k_rot = apply_rotary_pos_emb(
        q_pre.expand(5, D)[None, None], k_pre[None, None], cos[:, 5:], sin[:, 5:]
    )  # queries at q_pos
    _, k_rot = apply_rotary_pos_emb(k_pre[None, None], k_pre[None, None], cos[:, :5], sin[:, :5])
    logits = (q_rot[0, 0] * k_rot[0, 0]).sum(-1).double()
    center = to_pre_rope(q_rot[0, 0], q_pos, inv_freq)  # all equal: the center
    assert torch.allclose(center, center[:1].expand_as(center), atol=1e-5)
    keys_pre = to_pre_rope(k_rot[0, 0], k_pos, inv_freq)
    score = trig_scores(center[0], center[0].abs(), keys_pre, distances[:, None], inv_freq)
    assert torch.allclose(score, logits, atol=1e-4)


def test_triattention_prefers_the_keys_its_query_center_favours(model):
    """Keys aligned with the (pre-RoPE) query center outrank orthogonal ones at equal norm; the eviction keeps them."""
    H, G, D, N = 2, 2, 16, 40
    gen = torch.Generator().manual_seed(0)
    inv_freq = rope_inv_freq(model.model.layers[0].self_attn, D)
    pos = torch.arange(N)
    q_pre = torch.zeros(1, H * G, N, D)
    q_pre[..., 7] = 2.0  # lowest frequency pair (7, 15): almost no rotation over 40 tokens
    k_pre = torch.randn(1, H, N, D, generator=gen) * 0.05
    favoured = [2, 9, 17]
    k_pre[:, :, favoured, 7] = 3.0

    def rotate(x):
        z = torch.complex(x[..., : D // 2], x[..., D // 2 :])
        z = z * torch.polar(torch.ones(N, D // 2), pos[:, None].float() * inv_freq.float())
        return torch.cat([z.real, z.imag], dim=-1)

    cache = drive(model, "triattention:budget=8,every=4,recent=2", rotate(k_pre), rotate(q_pre), prompt=20)
    kept = cache.layers[0].state["pos"][0]
    assert all(set(favoured) <= set(kept[h].tolist()) for h in range(H))


def test_longgen_is_exact_for_the_full_cache_and_reports_the_schedule_bound(model):
    from kvsqueeze.bench.evaluators import longgen

    prompt = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    full = longgen(model, None, "none", prompt, n_tokens=30)
    assert full["top1_agreement"] == 1.0 and full["kl_mean"] < 1e-6
    res = longgen(model, None, "streaming_llm+interval:every=4,budget=8", prompt, reference=full["reference"])
    assert res["generated_tokens"] == 30
    assert 8 <= res["tokens_held_end"] <= 11
    assert res["kl_mean"] > 0 and res["cache_bytes"] < res["full_cache_bytes"]
