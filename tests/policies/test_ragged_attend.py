"""Attention over ragged blocks: the fused per-head path equals the reference partial attention."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.core.attention_math import causal_partial_attention, fused_partial_attention, partial_attention
from kvsqueeze.core.storage import DenseBlock


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ragged_block_attend_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([[5, 0, 9], [1, 7, 3]])
    N, D, M = int(lengths.sum()), 8, 6
    keys, values = torch.randn(N, D, generator=g).to(dtype), torch.randn(N, D, generator=g).to(dtype)
    q = torch.randn(2, 3, M, D, generator=g).to(dtype)
    out, lse = DenseBlock(keys, values, lengths).attend(q, 0.3)
    sizes = lengths.flatten().tolist()
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for i, (k_h, v_h) in enumerate(zip(keys.split(sizes), values.split(sizes), strict=True)):
        b, h = divmod(i, 3)
        if not k_h.shape[0]:
            assert torch.isinf(lse[b, h]).all() and (out[b, h] == 0).all()  # empty head: no contribution
            continue
        ref_out, ref_lse = partial_attention(q[b, h].float(), k_h.float(), v_h.float(), 0.3)
        torch.testing.assert_close(out[b, h].float(), ref_out, **tol)
        torch.testing.assert_close(lse[b, h], ref_lse, **tol)


def test_fused_uniform_matches_reference():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (4, 11, 11))
    out, lse = fused_partial_attention(q, k, v, 0.25)
    ref_out, ref_lse = partial_attention(q, k, v, 0.25)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_fused_causal_matches_reference():
    """The fused kernel's causal partial (query i sees keys 0..i) equals the masked reference, log-sum-exp too."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 9, 16, generator=g) for _ in range(3))
    out, lse = causal_partial_attention(q, k, v, 0.25)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    ref_out, ref_lse = partial_attention(q, k, v, 0.25, mask=causal)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert torch.equal(out[..., 0, :], v[..., 0, :])  # the first query sees only the first key
