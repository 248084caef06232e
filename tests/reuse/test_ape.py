"""APE: contexts encoded in parallel after a shared prefix; the query attends to them at temperature T with their
log-sum-exp scaled by S. With one context and T = S = 1 it is sequential encoding; parallel encoding does not
depend on the contexts' order; the block's partial is the paper's formula."""

from __future__ import annotations

import math

import pytest
import torch

from kvsqueeze.core.attention_math import fused_partial_attention
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.reuse.ape import APEBlock, ape_cache
from tests.conftest import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
EPS32 = torch.finfo(torch.float32).eps


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def query_logits(model, cache, query) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=query, past_key_values=cache, use_cache=True).logits


def test_one_context_at_temperature_one_is_sequential_encoding():
    model = tiny_model("llama")
    prefix, context, query = ids(6, 1), ids(20, 2), ids(5, 3)
    cache = ape_cache(model, prefix, [context], temperature=1.0, scale=1.0)
    assert cache.get_seq_length() == 26
    with torch.no_grad():
        full = model(input_ids=torch.cat([prefix, context, query], -1)).logits[:, -5:]
    torch.testing.assert_close(query_logits(model, cache, query), full, rtol=1e-4, atol=1e-4)


def test_parallel_contexts_do_not_depend_on_their_order():
    model = tiny_model("llama")
    prefix, a, b, query = ids(6, 4), ids(16, 5), ids(16, 6), ids(4, 7)
    ab = query_logits(model, ape_cache(model, prefix, [a, b]), query)
    ba = query_logits(model, ape_cache(model, prefix, [b, a]), query)
    torch.testing.assert_close(ab, ba, rtol=1e-4, atol=1e-4)
    plain = query_logits(model, ape_cache(model, prefix, [a, b], temperature=1.0, scale=1.0), query)
    assert not torch.allclose(ab, plain, atol=1e-3)  # temperature and scale change the attention


def test_block_partial_is_the_papers_formula():
    g = torch.Generator().manual_seed(8)
    B, H, M, N, D = 1, 2, 3, 10, 8
    q = torch.randn(B, H, M, D, generator=g)
    k, v = torch.randn(B * H * N, D, generator=g), torch.randn(B * H * N, D, generator=g)
    block = APEBlock(k, v, torch.full((B, H), N), temperature=0.5, scale=0.8)
    out, lse = block.attend(q, 0.25)
    logits = q @ k.view(B, H, N, D).transpose(-1, -2) * 0.25 / 0.5
    torch.testing.assert_close(out, torch.softmax(logits, -1) @ v.view(B, H, N, D), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, 0.8 * torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)
    _, plain_lse = fused_partial_attention(q, k.view(B, H, N, D), v.view(B, H, N, D), 0.25 / 0.5)
    assert math.isclose(float((lse - 0.8 * plain_lse).abs().max()), 0.0, abs_tol=1e-5)


def test_an_ape_cache_saves_and_loads_bit_for_bit(tmp_path):
    from kvsqueeze import CompressedCache

    model = tiny_model("llama")
    cache = ape_cache(model, ids(6, 9), [ids(10, 10), ids(12, 11)])
    loaded = CompressedCache.load(cache.save(tmp_path / "ape.safetensors"), model)
    query = ids(3, 12)
    assert torch.equal(query_logits(model, cache.fork(), query), query_logits(model, loaded, query))


@pytest.mark.parametrize(("temperature", "scale"), [(math.nan, 0.9), (0.9, math.inf), (0.0, 0.9), (0.9, -1.0)])
def test_temperature_and_scale_must_be_finite_and_positive(temperature, scale):
    model = tiny_model("llama")
    with pytest.raises(KVSqueezeError, match="must be finite numbers > 0"):
        ape_cache(model, ids(6, 1), [ids(8, 2)], temperature=temperature, scale=scale)
