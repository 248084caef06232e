"""KVQuant: exact pre-RoPE inversion, exact outliers, the nuq datatype's error bound, Q-Norm, Fisher-weighted
k-means, decode-time appends, effective bits, and runs through ``model.generate``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvsqueeze import CompressedCache
from kvsqueeze.calibration.kvquant import fit_kvquant, weighted_kmeans
from kvsqueeze.codecs.kvquant import KVQuantBlock, KVQuantCodec, formula_bits, rerope, rope_params, unrope
from kvsqueeze.codecs.quant import effective_bits
from kvsqueeze.core.context import LayerContext
from kvsqueeze.core.layer import CompressedLayer
from kvsqueeze.core.storage import storage_bytes
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import parse_method
from tests.conftest import tiny_model

D = 64
CENT = torch.tensor([-0.9, -0.3, 0.2, 0.8])  # a hand-made 2-bit datatype, deliberately non-uniform


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("kvquant") / "tiny.json"
    path.write_text(json.dumps(fit_kvquant(tiny_model("llama"), None, n_tokens=64)))
    return str(path)


def _ctx(keys, values, positions=None, layer=0):
    B, _, L, _ = keys.shape
    return LayerContext(layer, 1, keys, values, None, torch.ones(B, L, dtype=torch.bool), 1.0, positions=positions)


def _block(codec: KVQuantCodec, keys, values, cent=CENT, inv=None, start=0) -> KVQuantBlock:
    """Encode ``keys/values [N, D]`` (one head) with a hand-made datatype, bypassing the calibration file."""
    n = keys.shape[0]
    pos = torch.arange(start, start + n)
    return codec._build(keys, values, torch.tensor([[n]]), pos, torch.tensor([start + n]), cent.half(), cent.half(),
                        inv, 1.0)  # fmt: skip


def _data(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = (torch.randn(n, D, generator=g) + torch.linspace(-3, 3, D)).half().float()  # per-channel offsets
    values = torch.randn(n, D, generator=g).half().float()
    return keys, values


def test_pre_rope_inversion_matches_transformers_rope():
    model = tiny_model("llama")
    inv, scaling = rope_params(model)
    inv = torch.tensor(inv, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 7, 100, 2047, 5000]])
    pre = torch.randn(1, 1, 6, 16, generator=torch.Generator().manual_seed(1))
    cos, sin = model.model.rotary_emb(pre, pos)
    _, post = apply_rotary_pos_emb(pre, pre, cos, sin)
    back = unrope(post[0, 0], pos[0], inv, scaling)
    assert torch.allclose(back, pre[0, 0], atol=2e-6)  # post-RoPE -> pre-RoPE is the exact inverse (fp32 rounding)
    assert torch.allclose(rerope(back, pos[0], inv, scaling), post[0, 0], atol=2e-6)
    assert not torch.allclose(post[0, 0], pre[0, 0], atol=1e-2)  # the rotation did something


def test_outliers_are_restored_exactly_and_counted_per_vector():
    keys, values = _data()
    keys[5, 3], keys[77, 10], values[9, 40] = 250.0, -300.0, 123.5  # spikes, fp16-representable
    codec = KVQuantCodec(bits=2, outliers=0.01, prerope=False)
    block = _block(codec, keys, values)
    k_hat, v_hat = block.dequant_pre()
    kidx, vidx = block.k_idx.long(), block.v_idx.long()
    assert torch.equal(k_hat.view(-1)[kidx], keys.view(-1)[kidx])  # bit-exact
    assert torch.equal(v_hat.view(-1)[vidx], values.view(-1)[vidx])
    assert {5 * D + 3, 77 * D + 10} <= set(kidx.tolist()) and 9 * D + 40 in set(vidx.tolist())
    assert len(kidx) == D * round(0.01 * 400)  # per key channel: 1% of its 400 tokens
    assert len(vidx) == 400 * round(0.01 * D)  # per value token: round(0.64) = 1
    assert float((k_hat - keys).abs().max()) < 3.0  # the spikes did not stretch their channel's range


def test_nuq_error_within_half_the_gap_to_the_neighbouring_centroid():
    keys, values = _data(seed=2)
    block = _block(KVQuantCodec(bits=2, qnorm=False, prerope=False), keys, values)
    k_hat, v_hat = block.dequant_pre()
    c = CENT.half().float()
    for x, x_hat, mid, half in (
        (keys, k_hat, block.kmid.float()[0], block.khalf.float()[0]),  # per channel
        (values, v_hat, block.voff.float()[:, None], block.vscale.float()[:, None]),  # per token
    ):
        dense = torch.ones_like(x, dtype=torch.bool).view(-1)
        dense[(block.k_idx if x is keys else block.v_idx).long()] = False
        norm = (x - mid) / half
        q = ((x_hat - mid) / half).clamp(-1, 1)
        code = (q[..., None] - c).abs().argmin(-1)
        assert torch.allclose(q.view(-1)[dense], c[code].view(-1)[dense], atol=2e-3)  # dense elements: centroids
        # nearest centroid: within half the gap to the neighbour on its side (beyond the extremes: to ±1)
        lo = torch.where(code > 0, (c[code] - c[(code - 1).clamp(min=0)]) / 2, c[code] + 1)
        hi = torch.where(code < 3, (c[(code + 1).clamp(max=3)] - c[code]) / 2, 1 - c[code])
        err = norm - c[code]
        ok = ((err <= hi + 2e-3) & (-err <= lo + 2e-3)).view(-1)
        assert bool(ok[dense].all())


def test_qnorm_matches_mean_and_std_of_each_vector():
    keys, values = _data(seed=3)
    stats = {}
    for qn in (True, False):
        block = _block(KVQuantCodec(bits=2, qnorm=qn, prerope=False), keys, values)
        _, v_hat = block.dequant_pre()
        dense = torch.ones_like(values, dtype=torch.bool)
        dense.view(-1)[block.v_idx.long()] = False
        v, vh = values[0][dense[0]], v_hat[0][dense[0]]  # one token's dense elements
        stats[qn] = (abs(float(v.mean() - vh.mean())), abs(float(v.std(unbiased=False) - vh.std(unbiased=False))))
    assert stats[True][0] < 1e-2 and stats[True][1] < 1e-2
    assert stats[False][0] + stats[False][1] > 5 * (stats[True][0] + stats[True][1])


def test_weighted_kmeans_follows_the_fisher_weights():
    x = torch.cat([torch.full((100,), -0.5), torch.full((100,), 0.0), torch.full((100,), 0.5)])
    w = torch.cat([torch.ones(100), torch.zeros(100), torch.ones(100)])
    assert weighted_kmeans(x, w, 2) == pytest.approx([-0.5, 0.5])  # zero-weight mass pulls no centroid
    assert weighted_kmeans(x, torch.ones(300), 3) == pytest.approx([-0.5, 0.0, 0.5])


def test_calibration_gives_sorted_datatypes_in_range(config):
    data = json.loads(Path(config).read_text())
    assert data["rope"]["inv_freq"] and set(data["layers"]) == {"0", "1"}
    for per_bits in data["layers"].values():
        for b, dt in per_bits.items():
            for cents in dt.values():
                assert len(cents) == 1 << int(b) and cents == sorted(cents) and cents[0] >= -1 and cents[-1] <= 1


def test_effective_bits_close_to_the_formula():
    keys, values = _data(n=2048, seed=4)
    block = _block(KVQuantCodec(bits=2, outliers=0.01, prerope=False), keys, values)
    measured = 8 * block.nbytes() / (2 * 2048 * D)
    assert measured == pytest.approx(formula_bits(2, D, 2048, 0.01), rel=0.05)
    assert block.kcodes.numel() == 2048 * D * 2 // 8  # packed: four 2-bit codes per byte


def test_prerope_block_reads_back_post_rope_keys_and_appends_decoded_tokens():
    model = tiny_model("llama")
    inv = torch.tensor(rope_params(model)[0], dtype=torch.float64)
    pre, values = _data(n=64, seed=5)
    pre, values = pre[:, :16], values[:, :16]
    post = rerope(pre, torch.arange(10, 74), inv)
    codec = KVQuantCodec(bits=4, outliers=0.0)
    block = _block(codec, post, values, cent=torch.linspace(-1, 1, 16), inv=inv, start=10)
    k_hat, _ = block.materialize(torch.float32)
    bound = 2**0.5 * float(block.khalf.float().max()) / 15  # half the 4-bit gap, mixed by the rotation of pairs
    assert float((k_hat - post).abs().max()) < bound
    assert block.pos is None and block.pos_start.tolist() == [10]  # consecutive positions: one start per head
    new_pre = pre[:2].clone()
    new_pre[1, 4] = 99.0  # beyond channel 4's range: stored exactly as an outlier
    new_post = rerope(new_pre, torch.tensor([74, 75]), inv)
    grown = codec.append(block, new_post, values[:2], torch.tensor([[2]]))
    assert grown.lengths.tolist() == [[66]] and grown.pos is None and grown.next_pos.tolist() == [76]
    k_pre, _ = grown.dequant_pre()
    assert float(k_pre[65, 4]) == pytest.approx(99.0, abs=0.05)  # fp16 of 99 is exact
    k2, _ = grown.materialize(torch.float32)
    assert torch.allclose(k2[:64], k_hat)
    assert float((k2[64:] - new_post).abs().max()) < bound


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("evict", ["", "snapkv:window=8+"])
def test_generates_with_packed_prerope_storage(kind, evict, tmp_path):
    model = tiny_model(kind)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(fit_kvquant(model, None, n_tokens=64)))
    ids = torch.randint(1, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    cache = CompressedCache(model, f"{evict}kvquant:bits=2,config={path}", ratio=0.5 if evict else None)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=cache, pad_token_id=0)
    assert out.shape == (2, 58)
    held = [layer for layer in cache.layers if isinstance(layer, CompressedLayer)]
    for layer in held:
        assert layer.keys.shape[-2] == 0  # every decoded token quantized on arrival
        kept = layer.kept_lengths()
        if layer.is_sliding:  # gemma3's window of 8: what the window holds, quantized too
            assert int(kept.max()) <= 8 + 9
        else:
            assert len(layer.blocks) == 1 and int(kept.max()) == (24 if evict else 48) + 9
    full = [layer for layer in held if not layer.is_sliding]  # (a few tokens in a window of 8: metadata dominates)
    full_bits = 8 * storage_bytes([x.tensors() for x in full]) / sum(2 * int(x.kept_lengths().sum()) * 16 for x in full)
    assert 2.0 < full_bits < 8.0  # head dim 16, short heads: metadata weighs more than at 64
    held_bytes = cache.nbytes()  # distinct storages: RoPE frequencies and centroids shared by layers count once
    elements = sum(2 * int(layer.kept_lengths().sum()) * layer.keys.shape[-1] for layer in held)
    assert effective_bits(cache) == pytest.approx(8 * held_bytes / elements)


def test_quantization_error_is_small_at_4_bits(config):
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[0, -1], -1)
        kls = {}
        for bits in (2, 4):
            cache = CompressedCache(model, f"kvquant:bits={bits},config={config}")
            model(ids[:, :-1], past_key_values=cache)
            out = torch.log_softmax(model(ids[:, -1:], past_key_values=cache).logits[0, -1], -1)
            kls[bits] = float((ref.exp() * (ref - out)).sum())
    assert kls[4] < kls[2] and kls[4] < 1e-3


def test_bad_parameters_name_the_fix(config):
    with pytest.raises(KVSqueezeError, match="bits must be one of 2, 3, 4"):
        parse_method("kvquant:bits=5")
    with pytest.raises(KVSqueezeError, match="calibrate kvquant"):
        model = tiny_model("llama")
        CompressedCache(model, "kvquant").prefill(model, torch.ones(1, 8, dtype=torch.long))
    with pytest.raises(KVSqueezeError, match="not found"):
        KVQuantCodec(config="/nonexistent.json")._datatype(0)
    keys = torch.zeros(1, 1, 4, D)
    with pytest.raises(KVSqueezeError, match="no datatype for layer 7"):
        KVQuantCodec(config=config).encode(keys[0, 0], keys[0, 0], torch.tensor([[4]]), _ctx(keys, keys, layer=7))


@pytest.mark.model
def test_kvquant4_keeps_full_cache_greedy_answer_on_a_needle(smollm2, tmp_path):
    from kvsqueeze.data import haystack, insert_needle
    from kvsqueeze.pipeline import answer

    model, tok = smollm2
    path = tmp_path / "smollm2.json"
    path.write_text(json.dumps(fit_kvquant(model, tok, n_tokens=128)))  # Fisher weights from real gradients
    needle = "The secret code of the blue door is 4172."
    context = insert_needle(haystack(tok, 600), needle, 0.4)
    question = "What is the secret code of the blue door? Answer with the number only."
    full = answer(model, tok, "none", context, question, max_new_tokens=14)
    quant = answer(model, tok, f"kvquant:bits=4,config={path}", context, question, max_new_tokens=14)
    assert "4172" in full.text
    assert quant.text.rstrip(".") == full.text.rstrip(".")
    assert quant.cache_bytes < full.cache_bytes / 4


def test_block_without_host_copies_reads_them_once_from_its_tensors():
    # blocks saved before the host copies existed: the copies are rebuilt from the device tensors on first use
    keys, values = _data(n=40, seed=6)
    codec = KVQuantCodec(bits=2, prerope=False)
    block = _block(codec, keys, values, start=5)
    expected = (block.host_starts, block.host_next, block.host_span)
    for name in ("host_starts", "host_next", "host_span"):
        del block.__dict__[name]
    assert (block.host_starts, block.host_next, block.host_span) == expected == ((5,), (45,), (5, 44))
    grown = codec.append(block, keys[:3], values[:3], torch.tensor([[3]]))
    assert grown.host_next == (48,) and grown.host_span == (5, 47) and grown.pos is None
