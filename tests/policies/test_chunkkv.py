"""ChunkKV keeps whole chunks ranked by their summed scores (not the individually best tokens)."""

from __future__ import annotations

import torch

from kvsqueeze import CompressedCache
from kvsqueeze.policies.base import select
from kvsqueeze.policies.chunkkv import ChunkKV


def test_whole_chunks_by_aggregated_score(make_ctx):
    L, w = 24, 4
    ctx = make_ctx(H=2, L=L)
    votes = torch.full((1, 2, 1, L), 0.01)
    votes[..., 0, 2] = 0.5  # one strong token alone in chunk 0 (tokens 0-4)
    votes[..., 0, 10:15] = 0.2  # chunk 2 (tokens 10-14): no single token beats 0.5, but the sum (1.0) does
    votes[..., 0, 5:10] = 0.09  # chunk 1: sum 0.45
    ctx.window_attention = lambda window: votes.expand(1, 2, w, L) / w
    scorer = ChunkKV(chunk=5, window=w)
    scores = scorer.score(ctx)
    keep = select(scores, torch.tensor([[9, 9]]), ctx.valid)[0]
    expected = torch.zeros(L, dtype=torch.bool)
    expected[10:15] = True  # best chunk, whole
    expected[L - w :] = True  # observation window
    assert torch.equal(keep[0], expected) and torch.equal(keep[1], expected)
    keep = select(scores, torch.tensor([[12, 12]]), ctx.valid)[0]
    assert keep[0, 10:15].all() and keep[0, 2]  # then chunk 0's best token (partial last chunk, best tokens first)
    assert int(keep[0].sum()) == 12


def test_index_reuse_and_generate(tiny_model):
    torch.manual_seed(7)
    ids = torch.randint(0, 128, (1, 50))
    cache = CompressedCache(tiny_model, "chunkkv:chunk=4,window=4,reuse=2", ratio=0.5)
    cache.prefill(tiny_model, ids)
    kept = [layer.kept_lengths() for layer in cache.layers]
    assert all(int(x.sum()) == 2 * 25 for x in kept)
    cache = CompressedCache(tiny_model, "chunkkv:chunk=4,window=4", ratio=0.5)
    out = tiny_model.generate(ids, past_key_values=cache, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 53)
