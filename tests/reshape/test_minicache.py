"""MiniCache: the SLERP merge math, the paper's retention rule, and cross-layer shared storage in the cache."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kvsqueeze import CompressedCache
from kvsqueeze.codecs.minicache import MiniCacheBlock, angular_distance, merge_states, retained_pairs, slerp
from kvsqueeze.core.layer import CompressedLayer
from kvsqueeze.core.storage import DenseBlock, storage_bytes
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import parse_method
from tests.conftest import TINY, tiny_model

CONFIGS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM)}  # fmt: skip


def four_layers(kind: str = "llama", seed: int = 0):
    cfg, cls = CONFIGS[kind]
    torch.manual_seed(seed)
    extra = {"sliding_window": None} if kind == "mistral" else {}
    return cls(cfg(**{**TINY, "num_hidden_layers": 4}, **extra)).eval()


def _ids(n=40, batch=1, seed=0):
    return torch.randint(1, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _full_states(model, ids):
    """Every layer's exact keys/values ``[B, H, L, D]`` after a prefill."""
    cache = CompressedCache(model, "none")
    cache.prefill(model, ids)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _restored(layer) -> tuple[torch.Tensor, torch.Tensor]:
    block = layer.blocks[0]
    k, v = block.materialize(torch.float32)
    B, H = block.lengths.shape
    return k.view(B, H, -1, k.shape[-1]), v.view(B, H, -1, v.shape[-1])


# ---- the merge math --------------------------------------------------------------------------------------------
def test_identical_states_are_restored_exactly():
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(0))
    retained, direction, norm_a, norm_b = merge_states(x, x.clone(), t=0.6, gamma=0.0)
    assert not retained.any()  # γ = 0: every pair merged
    assert torch.allclose(norm_a[:, None] * direction, x, atol=1e-5)
    assert torch.allclose(norm_b[:, None] * direction, x, atol=1e-5)


def test_slerp_keeps_magnitudes_and_interpolates_the_angle():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(30, 8, generator=gen) * 3, torch.randn(30, 8, generator=gen)
    retained, direction, norm_a, norm_b = merge_states(a, b, t=0.5, gamma=0.0)
    assert not retained.any()
    assert torch.allclose((norm_a[:, None] * direction).norm(dim=-1), a.norm(dim=-1), atol=1e-5)
    assert torch.allclose((norm_b[:, None] * direction).norm(dim=-1), b.norm(dim=-1), atol=1e-5)
    ea, eb = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    assert torch.allclose((direction * ea).sum(-1), (direction * eb).sum(-1), atol=1e-5)  # t=0.5: midway
    omega = torch.arccos((ea * eb).sum(-1).clamp(-1, 1))
    d = slerp(ea, eb, 0.25)  # the angle to e_a is t · Ω
    assert torch.allclose(torch.arccos((d * ea).sum(-1).clamp(-1, 1)), 0.25 * omega, atol=1e-4)
    assert torch.allclose(slerp(ea, eb, 0.0), ea, atol=1e-5) and torch.allclose(slerp(ea, eb, 1.0), eb, atol=1e-5)


def test_retention_is_the_paper_threshold_per_group():
    dist = torch.tensor([0.10, 0.20, 0.90, 1.00, 0.50, 0.40, 0.45, 0.41])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # group 0: range [0.1, 1.0] -> threshold 1.0 - 0.2 * 0.9 = 0.82; group 1: [0.4, 0.5] -> 0.48
    assert retained_pairs(dist, groups, 0.2).tolist() == [False, False, True, True, True, False, False, False]
    assert not retained_pairs(dist, groups, 0.0).any()  # γ = 0: everything merged
    assert retained_pairs(dist, groups, 1.0).sum() == 6  # γ = 1: all but each group's closest pair
    x = torch.tensor([[1.0, 0.0]])
    assert torch.allclose(angular_distance(x, -x), torch.ones(1)) and angular_distance(x, 2 * x).item() < 1e-3


def test_opposite_token_is_retained_unmerged():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(10, 8, generator=gen)
    b = a + 0.01 * torch.randn(10, 8, generator=gen)
    b[7] = -a[7]
    retained, *_ = merge_states(a, b, t=0.5, gamma=0.05)
    assert retained.nonzero().flatten().tolist() == [7]


# ---- in the cache --------------------------------------------------------------------------------------------
def test_pairs_from_the_middle_layer_and_shared_directions_held_once():
    roles = [parse_method("minicache").codec.role(i, 30) for i in (14, 15, 16, 27, 28, 29)]
    assert roles == [None, "a", "b", "a", "b", "a"]  # SmolLM2: pairs (15, 16) … (27, 28), layer 29 unpaired
    model = four_layers()
    cache = CompressedCache(model, "minicache:start=0.5")  # layers 2 and 3 merged; 0 and 1 stored as they are
    cache.prefill(model, _ids())
    l0, l1, l2, l3 = cache.layers
    assert type(l0.blocks[0]) is DenseBlock and type(l1.blocks[0]) is DenseBlock
    a, b = l2.blocks[0], l3.blocks[0]
    assert isinstance(a, MiniCacheBlock) and a.paired and b.paired
    assert a.keys.direction is b.keys.direction and a.values.direction is b.values.direction
    # nbytes() is the sum of the distinct tensors held: the shared directions are counted once.
    seen, unique = set(), 0
    for layer in cache.layers:
        block = layer.blocks[0]
        parts = [block.keys, block.values] if isinstance(block, DenseBlock) else []
        tensors = parts if parts else [
            t for s in (block.keys, block.values) for t in (s.exact, s.merged, s.norms, s.direction)]  # fmt: skip
        tensors += [layer.keys, layer.values, block.lengths]
        for t in tensors:
            if t is not None and t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                unique += t.numel() * t.element_size()
    assert cache.nbytes() == unique + cache.tokens.numel() * 8  # + the context's token ids the cache records
    per_layer_full = l0.nbytes()
    merged_pair = storage_bytes(l2.tensors(), l3.tensors())  # the pair together: shared directions once
    assert merged_pair < 0.6 * 2 * per_layer_full  # about one layer's states + magnitudes + masks for two layers


def test_retained_tokens_are_bit_exact_and_the_retained_set_is_the_rule():
    model = four_layers()
    ids = _ids(n=48)
    full = _full_states(model, ids)
    cache = CompressedCache(model, "minicache:start=0,gamma=0.2,t=0.5")
    cache.prefill(model, ids)
    for pair in ((0, 1), (2, 3)):
        for kind in (0, 1):  # keys, values
            xa, xb = full[pair[0]][kind], full[pair[1]][kind]
            B, H, L, D = xa.shape
            groups = torch.arange(B * H).repeat_interleave(L)
            expected = retained_pairs(angular_distance(xa.reshape(-1, D), xb.reshape(-1, D)), groups, 0.2)
            assert 0 < int(expected.sum()) < expected.numel()
            for idx, x in zip(pair, (xa, xb), strict=True):
                states = cache.layers[idx].blocks[0].keys if kind == 0 else cache.layers[idx].blocks[0].values
                assert torch.equal(~states.merged, expected)
                assert torch.equal(states.exact, x.reshape(-1, D)[expected])  # bit-exact
                restored = _restored(cache.layers[idx])[kind].reshape(-1, D)
                assert torch.allclose(restored.norm(dim=-1), x.reshape(-1, D).norm(dim=-1), atol=1e-5)


def test_attention_runs_over_the_restored_states():
    """A decode step over the merged cache equals a full cache whose states were replaced by the restored ones."""
    model = four_layers()
    ids = _ids(n=40)
    cache = CompressedCache(model, "minicache:start=0")
    cache.prefill(model, ids)
    twin = CompressedCache(model, "none")
    twin.prefill(model, ids)
    for mine, other in zip(cache.layers, twin.layers, strict=True):
        other.keys, other.values = _restored(mine)
    step = torch.tensor([[5]])
    with torch.no_grad():
        got = model(step, past_key_values=cache).logits
        want = model(step, past_key_values=twin).logits
        exact = CompressedCache(model, "none")
        exact.prefill(model, ids)
        full = model(step, past_key_values=exact).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-5)  # merging really changed the states


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_generate_on_tiny_models_with_padding(kind):
    model = four_layers(kind)
    ids = _ids(n=32, batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    cache = CompressedCache(model, "minicache:start=0")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             past_key_values=cache, pad_token_id=0)  # fmt: skip
    assert out.shape == (2, 44)
    for layer in cache.layers:
        assert isinstance(layer, CompressedLayer) and layer.blocks[0].paired
        assert layer.kept_lengths()[1].tolist() == [27 + 11] * 2  # padding never stored; decode tokens appended
        assert isinstance(layer.blocks[-1], DenseBlock) and len(layer.blocks) == 2
    assert cache.nbytes() < 0.7 * cache.full_nbytes()


def test_composes_with_an_eviction_scorer():
    model = four_layers()
    ids = _ids(n=48)
    full = _full_states(model, ids)
    cache = CompressedCache(model, "snapkv:window=8+minicache:start=0", ratio=0.5)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, past_key_values=cache,
                             pad_token_id=0)  # fmt: skip
    assert out.shape == (1, 56)
    ref = CompressedCache(model, "snapkv:window=8", ratio=0.5)
    ref.prefill(model, ids)
    for layer, other in zip(cache.layers, ref.layers, strict=True):
        assert layer.blocks[0].lengths.tolist() == [[24, 24]]  # snapkv's budget, per head
        assert other.n_front == 24
    # Tokens kept by one layer of the pair only are stored exactly: each layer holds its own kept set.
    a, b = cache.layers[0].blocks[0], cache.layers[1].blocks[0]
    assert 0 < int(a.keys.merged.sum()) < 48  # the overlap is merged, the rest exact
    kept_a = ref.layers[0].keys.reshape(-1, full[0][0].shape[-1])
    assert torch.equal(a.keys.exact, kept_a[~a.keys.merged])
    assert int(a.keys.merged.sum()) == int(b.keys.merged.sum())


def test_refused_where_layers_cannot_pair():
    gemma = tiny_model("gemma3")  # full-attention layers 1 and 3 are not adjacent
    with pytest.raises(KVSqueezeError, match="adjacent full-attention"):
        CompressedCache(gemma, "minicache:start=0").prefill(gemma, _ids(n=16))
    model = four_layers()
    with pytest.raises(KVSqueezeError, match="prefill schedule"):
        cache = CompressedCache(model, "snapkv:window=4+minicache+interval:every=4,budget=8")
        with torch.no_grad():
            model.generate(_ids(n=24), max_new_tokens=4, do_sample=False, past_key_values=cache, pad_token_id=0)
    with pytest.raises(KVSqueezeError, match="gamma"):
        parse_method("minicache:gamma=2")


@pytest.mark.model
def test_smollm2_merges_the_deep_half(smollm2):
    model, tok = smollm2
    ids = tok("The history of the printing press begins in the fifteenth century. " * 12, return_tensors="pt").input_ids
    cache = CompressedCache(model, "minicache")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=cache)
    assert out.shape[-1] == ids.shape[-1] + 8
    layers = cache.layers
    assert all(type(layer.blocks[0]) is DenseBlock for layer in layers[:15])
    assert all(layer.blocks[0].paired for layer in layers[15:29]) and not layers[29].blocks[0].paired
    assert layers[15].blocks[0].keys.direction is layers[16].blocks[0].keys.direction
    # 14 of 30 layers share their directions: about 7/30 of the bytes saved, less magnitudes, masks, retained.
    saved = 1 - cache.nbytes() / cache.full_nbytes()
    assert 0.15 < saved < 7 / 30 + 1e-9
    assert math.isfinite(saved)
