"""EMS: the Global-Local score on hand-made attention; evicted tokens merge into similar centers or are evicted."""

from __future__ import annotations

import torch

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.context import LayerContext
from kvsqueeze.policies.base import PROTECTED
from kvsqueeze.policies.ems import evict_then_merge, global_local
from kvsqueeze.spec import parse_method
from tests.conftest import tiny_model


def test_global_local_score_on_hand_made_attention():
    # 4 queries x 4 keys, causal rows summing to 1
    A = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.5, 0.5, 0.0, 0.0],
            [0.6, 0.0, 0.4, 0.0],
            [0.1, 0.1, 0.2, 0.6],
        ]
    )
    score = global_local(A, window=2)
    # global: column sum / number of queries that see the token (4, 3, 2, 1); local: mean of the last 2 rows
    expected = torch.tensor([2.2 / 4 + 0.35, 0.6 / 3 + 0.05, 0.6 / 2 + 0.3, 0.6 / 1 + 0.3])
    assert torch.allclose(score, expected)
    # plain accumulated attention would rank the first token top; the normalized score puts the last ones ahead
    assert A.sum(0).argmax() == 0 and score.argmax() == 3


def test_scorer_equals_the_formula_over_the_model_attention():
    gen = torch.Generator().manual_seed(0)
    B, H, G, L, D = 1, 2, 2, 10, 8
    keys, values = torch.randn(B, H, L, D, generator=gen), torch.randn(B, H, L, D, generator=gen)
    queries = torch.randn(B, H * G, L, D, generator=gen)
    ctx = LayerContext(0, 1, keys, values, queries, torch.ones(B, L, dtype=torch.bool), D**-0.5)
    scorer = parse_method("ems:window=3").scorer
    got = scorer.score(ctx)
    logits = queries @ keys.repeat_interleave(G, 1).transpose(-1, -2) * D**-0.5
    A = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    expected = global_local(A, 3).view(B, H, G, L).mean(2)
    assert torch.allclose(got[..., :-3], expected[..., :-3], atol=1e-5)
    assert (got[..., -3:] == PROTECTED).all()


def test_evicted_tokens_merge_into_the_most_similar_center_or_fall_in_the_zero_class():
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.0]])
    values = torch.arange(10.0).view(5, 2)
    keep = torch.tensor([True, False, True, False, False])
    scores = torch.tensor([0.5, 0.2, 0.4, 0.3, 0.1])
    new_k, new_v, cls = evict_then_merge(keys, values, keep, scores, threshold=0.8)
    assert cls.tolist() == [-1, 0, -1, 2, -1]  # token 4 points away from every center: zero class (evicted)
    assert torch.allclose(new_k[0], (0.5 * keys[0] + 0.2 * keys[1]) / 0.7)
    assert torch.allclose(new_v[0], (0.5 * values[0] + 0.2 * values[1]) / 0.7)
    assert torch.allclose(new_k[2], (0.4 * keys[2] + 0.3 * keys[3]) / 0.7)
    # a head whose keys are all dissimilar only evicts (sparsity): centers untouched
    _, _, cls2 = evict_then_merge(keys, values, keep, scores, threshold=0.999)
    assert cls2.tolist() == [-1] * 5


def test_ems_through_generate():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 40))
    plain = CompressedCache(model, "ems:window=4,threshold=1.0", ratio=0.5)  # nothing reaches 1.0: pure eviction
    merged = CompressedCache(model, "ems:window=4,threshold=-1.0", ratio=0.5)  # every evicted token merges
    for cache in (plain, merged):
        out = model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
        assert out.shape[1] == 44
    assert plain.stats()["tokens_kept"] == merged.stats()["tokens_kept"] and plain.nbytes() == merged.nbytes()
    assert plain.nbytes() < 0.6 * plain.full_nbytes()
    assert not torch.allclose(plain.layers[0].keys, merged.layers[0].keys)
    window = plain.layers[0].keys[:, :, 16:20]  # the last 4 prompt tokens (kept, never centers) are exact
    assert torch.equal(window, merged.layers[0].keys[:, :, 16:20])
    assert parse_method("ems").scorer.protected(100) == 32
