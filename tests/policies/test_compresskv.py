"""CompressKV: the semantic retrieval heads alone decide which tokens every head keeps; layer budgets follow
the offline eviction error and sum exactly; the semantic score finds a head that looks around the target."""

from __future__ import annotations

import torch

from kvsqueeze import CompressedCache
from kvsqueeze.calibration.heads import save_head_scores
from kvsqueeze.policies.base import PROTECTED, select
from kvsqueeze.policies.compresskv import CompressKV, error_budgets


def _calibration(tmp_path, semantic):
    grid = torch.linspace(0, 1, 11)
    curves = [(1 - (1 - grid) ** 6).tolist(), grid.tolist()]  # layer 0 easy to compress, layer 1 hard
    path = tmp_path / "cal.json"
    zeros = [[0.0, 0.0], [0.0, 0.0]]
    save_head_scores({"induction": zeros, "echo": zeros, "semantic": semantic, "prefix_curves": curves}, path)
    return str(path)


def test_error_budgets_proportional_exact_and_clamped():
    b = error_budgets(torch.tensor([1.0, 3.0]), keep=100, lo=10, hi=400)
    assert b == [50, 150]
    b = error_budgets(torch.tensor([0.01, 10.0, 10.0]), keep=100, lo=20, hi=140)
    assert sum(b) == 300 and b[0] == 20 and all(20 <= x <= 140 for x in b)


def test_semantic_heads_decide_for_every_head(make_ctx, tmp_path):
    cal = _calibration(tmp_path, [[0.1, 0.9], [0.5, 0.2]])  # layer 0: KV head 1 is the SRH
    L, w = 16, 4
    ctx = make_ctx(H=2, L=L, layer_idx=0, num_layers=2)
    att = torch.full((1, 2, w, L), 0.01)
    att[:, 0, :, 3] = 0.9  # head 0 (not an SRH) looks at token 3
    att[:, 1, :, 9] = 0.9  # the SRH looks at token 9
    ctx.window_attention = lambda window: att
    scores = CompressKV(heads=cal, window=w, kernel=1).score(ctx)
    assert (scores[..., -w:] == PROTECTED).all()
    keep = select(scores, torch.tensor([[5, 5]]), ctx.valid)[0]
    assert keep[:, 9].all() and not keep[:, 3].any()  # both heads keep the SRH's token, not head 0's


def test_compresskv_generate_layer_budgets(tiny_model, tmp_path):
    cal = _calibration(tmp_path, [[0.1, 0.9], [0.5, 0.2]])
    torch.manual_seed(10)
    ids = torch.randint(0, 128, (1, 40))
    cache = CompressedCache(tiny_model, f"compresskv:heads={cal},window=4", ratio=0.5)
    out = tiny_model.generate(ids, past_key_values=cache, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 42)
    kept = [layer.kept_lengths()[0] - 1 for layer in cache.layers]
    assert sum(int(x.sum()) for x in kept) == 2 * 2 * 20
    assert int(kept[1][0]) > int(kept[0][0])  # the layer that loses more attention mass keeps more


def test_semantic_score_of_planted_head():
    from kvsqueeze.calibration.heads import head_scores, make_probes

    from .test_razorattention import planted_echo_model

    model = planted_echo_model()
    probes = make_probes(list(range(48)), n_probes=2, span=32, seed=2)
    semantic = torch.tensor(head_scores(model, probes)["semantic"])
    # the echo head looks exactly one token before the copy target: within the neighbourhood
    assert semantic[0, 0] >= 0.1 and semantic[0, 0] == semantic.max()
