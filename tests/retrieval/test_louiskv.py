"""LouisKV: no retrieval while the query stays within the threshold of the one that triggered the last retrieval,
retrieval past it; input clusters and output segments; every unit fetched is exact attention; the cache end to end
(hot budget, forks keep their own retrieved set, no syncs while decoding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvsqueeze import CompressedCache, KVSqueezeError, parse_method
from kvsqueeze.retrieval.louiskv import STATE, LouisKVBlock
from tests.retrieval.helpers import context, generate, ids, ragged, reference, tolerance

LENGTHS = [[64, 48], [57, 64]]


def encode(spec, keys, values, lengths) -> LouisKVBlock:
    return parse_method(spec).codec.encode(keys, values, lengths, context(keys, lengths))


def mix(a: torch.Tensor, b: torch.Tensor, cos: float) -> torch.Tensor:
    """A unit vector per head at cosine ``cos`` from unit ``a`` towards ``b`` (``[..., D]``)."""
    b = F.normalize(b - (b * a).sum(-1, keepdim=True) * a, dim=-1)
    return cos * a + (1 - cos**2) ** 0.5 * b


def test_no_retrieval_within_the_threshold_retrieval_past_it():
    keys, values, lengths = ragged(LENGTHS, seed=1)
    block = encode("louiskv:threshold=0.5,cluster=8,fetch=16", keys, values, lengths)
    g = torch.Generator().manual_seed(2)
    q0 = F.normalize(torch.randn(2, 2, 16, generator=g), dim=-1)
    other = torch.randn(2, 2, 16, generator=g)
    state: dict = {}
    block.attend_with_state(q0[:, :, None] * 4, 0.25, state)
    first = state[STATE]
    assert first["drift"].all() and first["retrievals"].eq(1).all()  # the first step always retrieves
    # within the threshold of q0 (cosine 0.7 > 0.5): the retrieved set stays, though a fresh one would differ
    q1 = mix(q0, other, 0.7)
    assert not torch.equal(block.input_candidates(q1[:, :, None] * 4), first["input"])
    block.attend_with_state(q1[:, :, None] * 4, 0.25, state)
    assert not state[STATE]["drift"].any() and torch.equal(state[STATE]["input"], first["input"])
    assert torch.equal(state[STATE]["ref"], first["ref"]) and state[STATE]["retrievals"].eq(1).all()
    # close to q1 (cosine > 0.5) but past the threshold from q0, the query that triggered the last retrieval
    q2 = mix(q1, -q0, 0.8)
    assert (F.cosine_similarity(q2, q1, dim=-1) > 0.5).all() and (F.cosine_similarity(q2, q0, dim=-1) < 0.5).all()
    block.attend_with_state(q2[:, :, None] * 4, 0.25, state)
    assert state[STATE]["drift"].all() and state[STATE]["retrievals"].eq(2).all()
    assert torch.equal(state[STATE]["input"], block.input_candidates(q2[:, :, None] * 4))


def test_retrieval_is_decided_per_head():
    keys, values, lengths = ragged(LENGTHS, seed=3)
    block = encode("louiskv:threshold=0.5,cluster=8,fetch=16", keys, values, lengths)
    q0 = F.normalize(torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(4)), dim=-1)
    state: dict = {}
    block.attend_with_state(q0[:, :, None], 0.25, state)
    before = state[STATE]["input"]
    q1 = q0.clone()
    q1[1, 0] = -q0[1, 0]  # only row 1, head 0 turns away
    block.attend_with_state(q1[:, :, None], 0.25, state)
    assert state[STATE]["drift"].tolist() == [[False, False], [True, False]]
    after = state[STATE]["input"]
    assert torch.equal(after[0], before[0]) and torch.equal(after[1, 1], before[1, 1])
    assert torch.equal(after[1, 0], block.input_candidates(q1[:, :, None])[1, 0])


def test_input_units_are_clusters_of_the_keys():
    g = torch.Generator().manual_seed(5)
    centres = F.normalize(torch.randn(3, 16, generator=g), dim=-1) * 6
    lengths = torch.tensor([[60, 45]])
    labels = torch.randint(0, 3, (105,), generator=g)
    keys = centres[labels] + 0.3 * torch.randn(105, 16, generator=g)
    block = encode("louiskv:cluster=20,iters=10,sinks=0", keys, keys.clone(), lengths)  # three clusters per head
    for h, (start, n) in enumerate([(0, 60), (60, 45)]):
        assign = block.assign[0, h, :n]
        truth = labels[start : start + n]
        for c in truth.unique():  # every true cluster lands in one unit, and no unit mixes two
            assert assign[truth == c].unique().numel() == 1
        assert assign.unique().numel() == truth.unique().numel()
        for c in assign.unique():  # each unit's centroid is the mean key of its tokens
            torch.testing.assert_close(block.centroids[0, h, c], keys[start : start + n][assign == c].mean(0))


def test_the_sinks_are_retrieved_first():
    keys, values, lengths = ragged(LENGTHS, seed=8)
    block = encode("louiskv:cluster=8,fetch=16,sinks=4", keys, values, lengths)
    assert block.sink == 8 and block.sizes[..., 8].eq(4).all()
    q = torch.randn(2, 2, 1, 16, generator=torch.Generator().manual_seed(9))
    index = block.input_candidates(q)
    assert all(set(range(4)) <= set(index[b, h].tolist()) for b in range(2) for h in range(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_every_unit_fetched_is_exact_attention(dtype, tier, tmp_path):
    keys, values, lengths = ragged(LENGTHS, dtype=dtype, seed=6)
    spec = "louiskv:cluster=8" + (f",tier=disk,dir={tmp_path}" if tier == "disk" else "")
    block = encode(spec, keys, values, lengths)
    assert block.in_slots == 64  # no budget: every token
    q = torch.randn(2, 2, 3, 16, generator=torch.Generator().manual_seed(7)).to(dtype)
    out, lse = block.attend_with_state(q, 0.25, {})
    ref, ref_lse = reference(q, keys, values, lengths, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=tolerance(dtype), rtol=tolerance(dtype))
    torch.testing.assert_close(lse.double(), ref_lse, atol=tolerance(dtype), rtol=tolerance(dtype))
    k, v = block.materialize(dtype)
    assert torch.equal(k, keys) and torch.equal(v, values)


def test_a_small_budget_is_not_exact():
    keys, values, lengths = ragged(LENGTHS, seed=6)
    block = encode("louiskv:cluster=8,fetch=16", keys, values, lengths)
    q = torch.randn(2, 2, 3, 16, generator=torch.Generator().manual_seed(7))
    out, _ = block.attend_with_state(q, 0.25, {})
    ref, _ = reference(q, keys, values, lengths, 0.25)
    assert (out.double() - ref).abs().max() > 1e-3


def test_output_segments_and_everything_fetched_decodes_like_the_full_cache(model):
    prompt = ids(150)
    full = generate(model, CompressedCache(model, "none"), prompt, n=40)
    cache = CompressedCache(model, "louiskv:out_segments=8")
    assert torch.equal(generate(model, cache, prompt, n=40), full)
    block = cache.layers[0].blocks[0]
    # the prompt's last 16 tokens were the window: 16 + 39 fed back, two 16-token segments have left it since
    assert len(cache.layers[0].blocks) == 1 and block.segments == 2 and block.store_out is not None
    assert int(block.lengths[0, 0]) == 150 - 16 + 32 and cache.nbytes(tier="cold") > 0
    reference_cache = CompressedCache(model, "none")
    generate(model, reference_cache, prompt, n=40)
    k, _ = block.materialize(torch.float32)  # input then output units hold exactly the tokens in order
    assert torch.equal(k.view(1, 2, -1, 16), reference_cache.layers[0].keys[:, :, : 150 - 16 + 32])


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_ratio_bounds_what_is_hot(model, ratio):
    cache = CompressedCache(model, "louiskv:residual=8,group=8,out_segments=1", ratio=ratio)
    cache.prefill(model, ids(600))
    full = cache.full_nbytes()
    generate(model, cache, torch.cat([ids(600), ids(1, 9)], -1), n=1)
    hot = cache.nbytes(tier="hot") - cache.tokens.numel() * 8  # the prefilled token ids are the cache's
    per_step = cache.stats()["fetched_bytes_per_token"]
    assert per_step > 0 and hot + per_step <= (1 - ratio) * full, (hot, per_step, full)
    assert hot + per_step >= 0.7 * (1 - ratio) * full  # the budget is used


def test_a_fork_keeps_its_own_retrieved_set(model):
    cache = CompressedCache(model, "louiskv", ratio=0.5)
    cache.prefill(model, ids(300))
    fork = cache.fork()
    generate(model, fork, torch.cat([ids(300), ids(3, 5)], -1), n=4)
    assert STATE in fork.layers[0].state and STATE not in cache.layers[0].state
    again = cache.fork()  # a second request starts fresh: its first step retrieves
    generate(model, again, torch.cat([ids(300), ids(3, 6)], -1), n=1)
    assert again.layers[0].state[STATE]["retrievals"].eq(1).all()


def test_decode_steps_do_not_synchronise(model):
    from kvsqueeze.core.compat import with_cache
    from tests.core.test_decode_syncs import SyncCounter, step

    cache = CompressedCache(model, "louiskv:residual=4,group=4", ratio=0.5)
    prompt = ids(300)
    with torch.no_grad():
        model(input_ids=prompt, attention_mask=torch.ones_like(prompt), **with_cache(model, cache), use_cache=True)
        counter = SyncCounter()
        with counter:
            counter.active = True
            for token in torch.randint(1, 128, (12, 1, 1), generator=torch.Generator().manual_seed(1)):
                step(model, cache, token)  # segments leave the window (flushes) inside the counted steps
    assert cache.layers[0].blocks[0].segments >= 1
    assert not counter.calls, sorted(set(counter.calls))


@pytest.mark.parametrize(
    ("spec", "ratio", "needle"),
    [
        ("louiskv", 0.95, "no room"),
        ("louiskv:cluster=0", None, "must be >= 1"),
        ("louiskv:threshold=2", None, "threshold in"),
        ("louiskv:tier=tape", None, "tier=ram or tier=disk"),
    ],
)
def test_mistakes_are_one_line(model, spec, ratio, needle):
    with pytest.raises(KVSqueezeError, match=needle) as err:
        generate(model, CompressedCache(model, spec, ratio=ratio), ids(300), n=1)
    assert "\n" not in str(err.value)
