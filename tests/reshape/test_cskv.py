"""CSKV: only rank-r coordinates are stored; attention equals exact attention over the reconstruction."""

from __future__ import annotations

import torch

from kvsqueeze.calibration.cskv import fit_cskv
from kvsqueeze.codecs.cskv import CSKVBlock
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.context import LayerContext
from kvsqueeze.spec import parse_method
from tests.conftest import tiny_model

B, H, L, D = 2, 2, 20, 8


def make(seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, L, D, generator=gen) * torch.linspace(0.1, 3.0, D)
    values = torch.randn(B, H, L, D, generator=gen)
    ctx = LayerContext(0, 1, keys, values, None, torch.ones(B, L, dtype=torch.bool), D**-0.5)
    return keys, values, ctx


def encode(spec, keys, values, ctx):
    codec = parse_method(spec).codec
    return codec.encode(keys.reshape(-1, D), values.reshape(-1, D), torch.full((B, H), L), ctx)


def test_stored_coordinates_have_rank_width_and_bases_are_the_top_singular_vectors():
    keys, values, ctx = make()
    block = encode("cskv:rank_k=3,rank_v=5", keys, values, ctx)
    assert isinstance(block, CSKVBlock)
    assert block.ck.shape == (B * H * L, 3) and block.cv.shape == (B * H * L, 5)
    lengths_bytes = B * H * 8  # the block's [B, H] int64 lengths
    assert block.nbytes() == (B * H * L * (3 + 5) + B * H * D * (3 + 5)) * 4 + lengths_bytes < 2 * B * H * L * D * 4
    for b in range(B):
        for h in range(H):
            _, _, vh = torch.linalg.svd(keys[b, h], full_matrices=False)
            # same subspace as the top-3 right singular vectors
            proj = block.uk[b, h] @ block.uk[b, h].T
            assert torch.allclose(proj, vh[:3].T @ vh[:3], atol=1e-4)
            k_hat = keys[b, h] @ proj
            best = keys[b, h] @ vh[:3].T @ vh[:3]  # Eckart–Young optimum
            assert torch.allclose(k_hat, best, atol=1e-4)


def test_attention_equals_exact_attention_over_reconstructed_keys_and_values():
    keys, values, ctx = make(1)
    block = encode("cskv:rank_k=2,rank_v=3", keys, values, ctx)
    k_hat, v_hat = block.materialize(torch.float32)
    k_hat, v_hat = k_hat.view(B, H, L, D), v_hat.view(B, H, L, D)
    q = torch.randn(B, H, 3, D)
    out, lse = block.attend(q, D**-0.5)
    logits = q @ k_hat.transpose(-1, -2) * D**-0.5
    assert torch.allclose(out, logits.softmax(-1) @ v_hat, atol=1e-5)
    assert torch.allclose(lse, logits.logsumexp(-1), atol=1e-5)
    exact = q @ keys.transpose(-1, -2) * D**-0.5
    assert not torch.allclose(lse, exact.logsumexp(-1), atol=1e-3)  # rank 2 of 8 is lossy


def test_full_rank_is_exact():
    keys, values, ctx = make(2)
    block = encode(f"cskv:rank_k={D},rank_v={D}", keys, values, ctx)
    q = torch.randn(B, H, 4, D)
    out, lse = block.attend(q, D**-0.5)
    logits = q @ keys.transpose(-1, -2) * D**-0.5
    assert torch.allclose(out, logits.softmax(-1) @ values, atol=1e-5)
    assert torch.allclose(lse, logits.logsumexp(-1), atol=1e-5)


def tiny():
    return tiny_model("llama")


def test_cskv_through_generate_with_context_bases_and_flushes():
    model = tiny()
    ids = torch.randint(0, 128, (1, 40))
    cache = CompressedCache(model, "cskv:rank_k=4,rank_v=6,residual=8,group=4")
    out = model.generate(ids, past_key_values=cache, max_new_tokens=9, do_sample=False)
    assert out.shape[1] == 49
    layer = cache.layers[0]
    (block,) = layer.blocks
    # 32 encoded at prefill + 8 flushed of the 8 appended (residual 8 stays full precision, one group of 4 pending)
    assert block.lengths.tolist() == [[40, 40]] and layer.keys.shape[2] == 8
    assert block.ck.shape == (80, 4) and block.cv.shape == (80, 6)
    # coords + bases + fp32 tail + lengths
    per_layer = 80 * (4 + 6) * 4 + 2 * 16 * (4 + 6) * 4 + 2 * 2 * 8 * 16 * 4 + 2 * 8
    assert cache.nbytes() == 2 * per_layer < cache.full_nbytes()
    full = model.generate(ids, max_new_tokens=9, do_sample=False)
    lossless = CompressedCache(model, "cskv:rank_k=16,rank_v=16,residual=8,group=4")
    assert torch.equal(model.generate(ids, past_key_values=lossless, max_new_tokens=9, do_sample=False), full)


def test_cskv_with_an_offline_basis_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path))
    model = tiny()
    path = fit_cskv(model, None, n_tokens=64)
    assert path.is_relative_to(tmp_path) and fit_cskv(model, None, n_tokens=64) == path  # cached
    ids = torch.randint(0, 128, (1, 30))
    cache = CompressedCache(model, f"cskv:rank_k=5,rank_v=7,residual=4,group=2,basis={path}")
    model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
    block = cache.layers[1].blocks[0]
    assert block.ck.shape[-1] == 5 and block.cv.shape[-1] == 7
    data = torch.load(path, weights_only=True)
    assert torch.equal(block.uk[0], data["keys"][1][:, :, :5])  # the calibrated layer basis, not a refit
    basis = 2 * 16 * (5 + 7) * 4  # held once
    assert block.nbytes() == block.ck.numel() * 4 + block.cv.numel() * 4 + basis + block.lengths.numel() * 8
