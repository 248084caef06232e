"""Calibration reads attention rows of the last queries from a cached tail pass: equal to a full eager pass."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.calibration.heads import tail_attentions
from tests.conftest import tiny_model


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_tail_attentions_equal_the_rows_of_a_full_eager_pass(kind):
    model = tiny_model(kind)
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        full = model(input_ids=ids[None], output_attentions=True, use_cache=False).attentions
    model.set_attn_implementation("sdpa")
    tail = tail_attentions(model, ids, 8)
    assert model.config._attn_implementation == "sdpa"  # the model's own attention is restored
    tol = torch.finfo(torch.float32).eps * 64
    for f, t in zip(full, tail, strict=True):
        assert t.shape == f[0, :, -8:, :].shape
        torch.testing.assert_close(t, f[0, :, -8:, :], atol=tol, rtol=tol)
