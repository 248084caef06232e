"""Key re-rotation after eviction (``prefill:rerotate=true``, kvpress' KeyRerotationPress): kept keys equal the keys
the same tokens would have at their new positions, later tokens continue at the kept count, the rest is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvsqueeze
from kvsqueeze import CompressedCache, KVSqueezeError
from kvsqueeze.schedules import base as schedules
from tests.bench.conftest import CharTokenizer
from tests.conftest import tiny_model

EPS32 = torch.finfo(torch.float32).eps


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_rerotated_keys_equal_keys_computed_at_the_new_positions(monkeypatch):
    """Layer 0's keys depend only on the token and its position: a forward that puts each kept token at its rank
    gives the keys re-rotation must produce (checked head by head)."""
    model = tiny_model("llama")
    context = ids(40)
    seen = {}
    original = schedules.rerotate_kept

    def spy(keys, keep, ctx, rope, shared):
        seen[ctx.layer_idx] = keep.clone()
        return original(keys, keep, ctx, rope, shared)

    monkeypatch.setattr(schedules, "rerotate_kept", spy)
    cache = CompressedCache(model, "knorm+prefill:rerotate=true", ratio=0.5)
    cache.prefill(model, context)
    keep = seen[0][0]  # [H, L]
    assert cache.get_seq_length() == 20 and cache.layers[0].keys.shape[2] == 20
    for head in range(keep.shape[0]):
        positions = torch.zeros(40, dtype=torch.long)
        positions[keep[head]] = torch.arange(20)
        reference = DynamicCache()
        with torch.no_grad():
            model(input_ids=context, position_ids=positions[None], past_key_values=reference, use_cache=True)
        want = reference.layers[0].keys[0, head, keep[head]]
        got = cache.layers[0].keys[0, head]
        tol = 8 * EPS32 * float(want.abs().max())  # float64 rotation vs transformers' float32 RoPE
        assert torch.allclose(got, want, atol=tol, rtol=0), float((got - want).abs().max())


def test_later_tokens_continue_at_the_kept_count():
    """After re-rotation the cache holds 20 positions: the question takes positions 20…, bytes still compare with a
    full cache of the 40 tokens, and the pipeline answers from a fork."""
    model = tiny_model("llama")
    context = ids(40, seed=1)
    cache = CompressedCache(model, "snapkv:window=8+prefill:rerotate=true", ratio=0.5)
    cache.prefill(model, context)
    full = CompressedCache(model, "none")
    full.prefill(model, context)
    assert cache.get_seq_length() == 20 and cache.full_nbytes() == full.full_nbytes()
    fork = cache.fork()
    with torch.no_grad():
        out = model(input_ids=ids(3, seed=2), past_key_values=fork, use_cache=True)
    assert fork.get_seq_length() == 23 and torch.isfinite(out.logits).all()
    pipe = kvsqueeze.pipeline(model, CharTokenizer(), "snapkv:window=8+prefill:rerotate=true", ratio=0.5)
    text = "the quick brown fox jumps over the lazy dog while the cat sleeps. " * 2
    answers = pipe(text, questions=["who jumps?", "who sleeps?"], max_new_tokens=4)["answers"]
    assert len(answers) == 2 and answers[0] == pipe(text, question="who jumps?", max_new_tokens=4)["answer"]


@pytest.mark.parametrize(
    ("arch", "spec", "message"),
    [
        ("llama", "snapkv:window=8+adakv+prefill:rerotate=true", "same kept count"),
        ("gemma3", "knorm+prefill:rerotate=true", "full-attention layers only"),
    ],
)
def test_what_rerotation_cannot_do_is_refused(arch, spec, message):
    model = tiny_model(arch)
    cache = CompressedCache(model, spec, ratio=0.5)
    with pytest.raises(KVSqueezeError, match=message):
        cache.prefill(model, ids(40, seed=3))


def test_generate_compressing_its_own_prompt_is_refused():
    """generate keeps counting positions from the prompt's length: over shifted keys that is refused, not silent."""
    model = tiny_model("llama")
    cache = CompressedCache(model, "knorm+prefill:rerotate=true", ratio=0.5)
    with pytest.raises(KVSqueezeError, match="continues at 40"):
        model.generate(ids(40), past_key_values=cache, max_new_tokens=3, do_sample=False)
