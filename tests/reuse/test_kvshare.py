"""KVShare: tokens matched against earlier requests reuse their keys at the new positions; Dual-Stage High Deviation
recomputes the matched tokens whose reused key deviates most at the probe layer (prefill) and the reused tokens the
first generated token attends to most (decode); requests are scheduled by hit rate."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvsqueeze import CompressedCache, KVSqueezeError
from kvsqueeze.reuse import kvshare
from tests.conftest import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
EPS32 = torch.finfo(torch.float32).eps


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def full(model, token_ids) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=token_ids, past_key_values=cache, use_cache=True)
    return cache


def close(a, b) -> bool:
    tol = 32 * EPS32 * float(b.abs().max())
    return torch.allclose(a, b, atol=tol, rtol=0)


def indexed(model, *prompts) -> kvshare.Index:
    index = kvshare.Index(min_match=4)
    for p in prompts:
        cache = CompressedCache(model, "none")
        cache.prefill(model, p)
        index.add(p, cache)
    return index


def test_alignment_and_scheduling_by_hit_rate():
    a, b, c = ids(12, 1), ids(10, 2), ids(9, 3)
    source = kvshare.align(torch.cat([b, a], -1)[0], torch.cat([a, c], -1)[0], 4)
    assert torch.equal(source[:10], torch.full((10,), -1)) and torch.equal(source[10:], torch.arange(12))
    model = tiny_model("llama")
    index = indexed(model, torch.cat([a, c], -1))
    prompts = [torch.cat([b, ids(12, 9)], -1), torch.cat([b, a], -1), torch.cat([a, c], -1)]
    assert kvshare.schedule(index, prompts) == [2, 1, 0]


def test_every_aligned_token_is_the_same_token_inside_a_shared_run_and_every_shared_run_is_aligned():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # a small vocabulary: many repeated runs
        new, old = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 3, (50,), generator=g)
        source = kvshare.align(new, old, 3)
        grams = {tuple(old[j : j + 3].tolist()) for j in range(48)}
        for t in range(60):
            shared = any(tuple(new[i : i + 3].tolist()) in grams for i in range(max(0, t - 2), min(t, 57) + 1))
            assert (source[t] >= 0) == shared
            if shared:
                assert old[source[t]] == new[t]


def test_all_or_nothing_recomputed_and_the_most_deviating_tokens_chosen():
    model = tiny_model("llama")
    a, b = ids(16, 1), ids(16, 2)
    index = indexed(model, torch.cat([a, b], -1))
    prompt = torch.cat([b, a], -1)  # every token matched, each at another position
    everything, _ = kvshare.assemble(model, index, prompt, fraction=1.0)
    for mine, ref in zip(everything.layers, full(model, prompt).layers, strict=True):
        assert close(mine.keys, ref.keys) and close(mine.values, ref.values)
    chosen = []
    original = kvshare.recompute_tokens
    kvshare.recompute_tokens = lambda m, c, t, p: (chosen.append(p), original(m, c, t, p))
    try:
        kvshare.assemble(model, index, prompt, fraction=0.25, probe=1)
    finally:
        kvshare.recompute_tokens = original
    # reference: the reused layer-1 keys moved to their new places vs. the same prompt's layer-1 keys in context
    moved, _ = kvshare.assemble(model, index, prompt, fraction=0.0)
    fresh = full(model, prompt).layers[1].keys
    deviation = (fresh - moved.layers[1].keys).norm(dim=-1).mean((0, 1)) / fresh.norm(dim=-1).mean((0, 1))
    assert torch.equal(chosen[0], torch.topk(deviation, 8).indices.sort().values)
    same, positions = kvshare.assemble(model, index, torch.cat([a, b], -1), fraction=0.0)  # the cached request
    assert positions.numel() == 0
    assert all(torch.equal(m.keys, t.keys) for m, t in zip(same.layers, index.requests[0].cache.layers, strict=True))
    with pytest.raises(KVSqueezeError, match="fraction must be in"):
        kvshare.assemble(model, index, prompt, fraction=2.0)


def test_unmatched_tokens_are_computed_and_the_decode_stage_refreshes_what_the_new_token_attends_to():
    model = tiny_model("llama")
    a, b = ids(16, 1), ids(12, 5)
    index = indexed(model, torch.cat([a, ids(10, 7)], -1))
    prompt = torch.cat([b, a], -1)
    cache, positions = kvshare.assemble(model, index, prompt, fraction=0.0)
    assert torch.equal(positions, torch.arange(12))  # b was never seen: computed, a reused as is
    for mine, ref in zip(cache.layers, full(model, b).layers, strict=True):  # b comes first: exact
        assert close(mine.keys[:, :, :12], ref.keys)
    reused = torch.ones(28, dtype=torch.bool)
    reused[positions] = False
    before = [layer.keys[:, :, :28].clone() for layer in cache.layers]
    attention = torch.zeros(28)
    eager = tiny_model("llama")
    eager.config._attn_implementation = "eager"
    with torch.no_grad():  # reference: the new token's attention over the 28 held tokens, from the same cache
        fork = cache.fork()
        out = eager(input_ids=torch.tensor([[7]]), past_key_values=fork, use_cache=True, output_attentions=True)
    for layer in out.attentions:
        attention += layer[0, :, 0, :28].mean(0)
    refreshed, logits = kvshare.refresh_at_decode(model, cache, prompt, 7, reused, decode_fraction=0.25)
    assert torch.equal(refreshed, torch.topk(attention.masked_fill(~reused, -1), 4).indices.sort().values)
    assert logits.shape == (128,) and cache.get_seq_length() == 29
    layer = cache.layers[1]
    changed = (layer.keys[:, :, :28] != before[1]).any(-1).any(0).any(0)
    assert torch.equal(torch.nonzero(changed).flatten(), refreshed)  # only those were recomputed
