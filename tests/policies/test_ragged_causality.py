"""Causality survives unequal lengths: after a compression that leaves layers, heads and rows with different
token counts, a multi-token block fed in one forward gives the logits of feeding it token by token."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import CompressedCache


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


METHODS = ["snapkv:window=4+adakv", "snapkv:window=4+pyramidkv:beta=4", "snapkv:window=2,kernel=1+adakv:alpha=0"]


@pytest.mark.parametrize("method", METHODS)
def test_block_equals_token_by_token(tiny_model, method):
    torch.manual_seed(3)
    B, L, Q = 2, 40, 6
    ids = torch.randint(0, 128, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :7] = 0  # row 1 is left-padded: it keeps fewer tokens than row 0
    cache = CompressedCache(tiny_model, method, ratio=0.55)
    with torch.no_grad():
        tiny_model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), past_key_values=cache)
    lengths = [layer.kept_lengths() for layer in cache.layers]
    flat = torch.stack(lengths).flatten().tolist()
    assert len(set(flat)) > 2, f"the compression should be ragged, got {flat}"
    assert lengths[0][0].sum() != lengths[0][1].sum()  # rows differ too

    block = torch.randint(0, 128, (B, Q))  # question + answer prefix
    full_mask = torch.cat([mask, torch.ones(B, Q, dtype=torch.long)], dim=1)
    pos = _positions(full_mask)[:, L:]

    one = cache.fork()
    with torch.no_grad():
        together = tiny_model(input_ids=block, attention_mask=full_mask, position_ids=pos, past_key_values=one).logits
    step = cache.fork()
    singles = []
    with torch.no_grad():
        for t in range(Q):
            out = tiny_model(
                input_ids=block[:, t : t + 1],
                attention_mask=full_mask[:, : L + t + 1],
                position_ids=pos[:, t : t + 1],
                past_key_values=step,
            )
            singles.append(out.logits)
    singles = torch.cat(singles, dim=1)
    torch.testing.assert_close(together, singles, atol=1e-5, rtol=1e-4)
    # the compressed context itself was left as it was
    assert [layer.kept_lengths().tolist() for layer in cache.layers] == [x.tolist() for x in lengths]
    # and the forks hold the same number of tokens after the same tokens
    assert [x.kept_lengths().tolist() for x in one.layers] == [x.kept_lengths().tolist() for x in step.layers]
