"""EpiCache (arXiv 2509.17396): block-wise prefill bounded by budget + block, episodes by deterministic k-means,
questions routed to the nearest centroid, layer budgets that follow the measured sensitivity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from kvsqueeze import CompressedCache, KVSqueezeError
from kvsqueeze.policies.epicache import (
    EpiCache,
    LexicalEmbedder,
    allocate_budgets,
    kmeans,
    layer_sensitivity,
    route,
)
from kvsqueeze.prompts import encode
from tests.bench.conftest import CharTokenizer

BUDGET, BLOCK, PATCH = 48, 64, 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)  # head_dim 64: the schedule's bookkeeping (positions, validity) stays ~2 % of the KV bytes
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def conversation(turns: int = 24) -> list[dict]:
    topics = ("apples grow on trees ", "ships sail the seas ", "stars shine at night ")
    messages = []
    for i in range(turns):
        messages.append({"role": "user", "content": topics[i % 3] * 2 + f"note {i}."})
        messages.append({"role": "assistant", "content": "Noted."})
    return messages


@pytest.fixture(scope="module")
def epi(model):
    return EpiCache(model, CharTokenizer(), budget=BUDGET, block=BLOCK, patch=PATCH, episodes=3, embedder="hidden",
                    calibration_tokens=128).prefill(conversation())  # fmt: skip


def kv_bytes(model, tokens: int) -> int:
    c = model.config
    return 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4 * c.num_hidden_layers * tokens


def test_blockwise_prefill_peak_never_exceeds_budget_plus_block(model, epi):
    blocks = -(-len(epi.ids) // (BLOCK - PATCH))
    assert blocks >= 15  # a long prefill: the full cache would be many times the bound
    bound = kv_bytes(model, BUDGET + BLOCK) * 1.05  # the schedule's per-token bookkeeping is ~2 %
    assert len(epi.block_bytes) == 2 * blocks * len(epi.episodes)  # after each block, and with its patched prompt
    assert max(epi.block_bytes) <= bound
    assert epi.peak_bytes <= bound  # also every layer update during the forwards (cache.peak_bytes)
    for e in epi.episodes:
        assert e.cache.full_nbytes() > 5 * bound
        kept = [int(layer.kept_lengths().max()) for layer in e.cache.layers]
        assert kept == epi.layer_budgets  # each layer at its own budget after the last block


def test_without_blocks_the_peak_is_the_whole_conversation(model, epi):
    cache = CompressedCache(model, "snapkv", budget=BUDGET)
    cache.prefill(model, torch.tensor([epi.ids]))
    assert cache.peak_bytes > 5 * kv_bytes(model, BUDGET + BLOCK)


def test_question_is_routed_to_the_nearest_centroid(model, epi):
    tok = CharTokenizer()
    for question in ("apples grow on trees?", "ships sail the seas?", "stars shine at night?", "note 7"):
        q = epi.embed([encode(tok, question)])[0]
        cos = [float(F.cosine_similarity(q, e.centroid, dim=0)) for e in epi.episodes]
        assert epi.route(question) == max(range(len(cos)), key=cos.__getitem__)
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert route(torch.tensor([0.1, 5.0]), centroids) == 1
    assert route(torch.tensor([-3.0, 1.0]), centroids) == 2  # cosine, not distance: the scale does not matter


def test_lexical_embedding_is_tf_idf_and_routes_by_the_rare_tokens_a_question_shares():
    segments = [[1, 2, 2, 9], [1, 3, 3, 9], [1, 5, 6, 9], [1, 2, 4, 4, 4, 9]]  # 1 and 9 in every segment
    lex = LexicalEmbedder.fit(segments)
    emb = lex(segments)

    def col(token: int) -> int:
        return int(torch.searchsorted(lex.vocab, torch.tensor(token)))

    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert float(emb[:, col(1)].abs().max()) == 0.0 and float(emb[:, col(9)].abs().max()) == 0.0  # idf log(4/4)
    assert torch.isclose(lex.idf[col(2)], torch.log(torch.tensor(2.0))) and float(emb[0, col(2)]) == 1.0
    expected = (1 + torch.log(torch.tensor(3.0))) * torch.log(torch.tensor(4.0)) / torch.log(torch.tensor(2.0))
    assert torch.isclose(emb[3, col(4)] / emb[3, col(2)], expected)  # sublinear tf (3 times), df 1 vs 2
    assert torch.allclose(emb[2, [col(5), col(6)]], torch.full((2,), 0.5**0.5))
    for k, question in enumerate(([1, 9, 2, 2], [9, 3, 77], [6, 1])):  # 77: a token the conversation never holds
        assert route(lex([question])[0], emb) == k


def test_lexical_episodes_are_the_topics_and_questions_go_to_their_topic(model):
    topics = ("abab baba ", "cdcd dcdc ", "efef fefe ")
    messages = []
    for i in range(18):
        messages += [{"role": "user", "content": topics[i % 3] * 2}, {"role": "assistant", "content": "ok"}]
    epi = EpiCache(model, CharTokenizer(), budget=BUDGET, block=BLOCK, patch=PATCH, episodes=3,
                   calibration_tokens=128).prefill(messages)  # fmt: skip
    assert len(epi.episodes) == 3
    for e in epi.episodes:  # segment j holds topic j % 3
        assert len({j % 3 for j in e.members}) == 1
    for k, question in enumerate(("ab?", "cd?", "ef?")):
        routed = epi.episodes[epi.route(question)]
        assert {j % 3 for j in routed.members} == {k}


def test_episodes_keep_what_their_own_patched_prompt_attends_to(epi):
    assert len({tuple(e.patch) for e in epi.episodes}) == len(epi.episodes)
    kept = [e.cache.layers[0].state["pos"][0, 0].tolist() for e in epi.episodes]
    assert len({tuple(k) for k in kept}) == len(kept)  # episode-specific eviction
    for e in epi.episodes:  # the medoid is the member of highest cosine to the centroid
        assert e.medoid in e.members


def test_budgets_follow_the_measured_sensitivity(model, epi):
    ids = torch.tensor([encode(CharTokenizer(), "the quick brown fox jumps over the lazy dog " * 6)])
    s = layer_sensitivity(model, 0.75, ids, window=16)
    assert len(s) == model.config.num_hidden_layers and min(s) >= 0
    budgets = allocate_budgets(s, 100)
    assert sum(budgets) == 100 * len(s)
    for i in range(len(s)):
        for j in range(len(s)):
            if s[i] > s[j]:
                assert budgets[i] >= budgets[j]
    b = allocate_budgets([0.1, 0.3, 0.2], 10)
    assert b[1] > b[2] > b[0] and sum(b) == 30
    order = sorted(range(len(s)), key=lambda i: epi.sensitivity[i])
    assert [epi.layer_budgets[i] for i in order] == sorted(epi.layer_budgets)


def test_kmeans_is_deterministic_and_finds_separated_clusters():
    gen = torch.Generator().manual_seed(1)
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    x = torch.cat([c + 0.3 * torch.randn(20, 2, generator=gen) for c in centres])
    a, ca = kmeans(x, 3, seed=7)
    b, cb = kmeans(x, 3, seed=7)
    assert torch.equal(a, b) and torch.equal(ca, cb)
    for group in range(3):  # each true cluster is one label
        assert len(set(a[group * 20 : (group + 1) * 20].tolist())) == 1
    assert len(set(a.tolist())) == 3


def test_bad_inputs_are_one_line(model):
    with pytest.raises(KVSqueezeError, match="ratio"):
        EpiCache(model, CharTokenizer())
    with pytest.raises(KVSqueezeError, match="embedder must be one of"):
        EpiCache(model, CharTokenizer(), ratio=0.5, embedder="bert")
    with pytest.raises(KVSqueezeError, match="half the block"):
        EpiCache(model, CharTokenizer(), ratio=0.5, block=32, patch=32)
    cache = CompressedCache(model, "epicache", ratio=0.5)
    with pytest.raises(KVSqueezeError, match="patched prompts"):
        cache.prefill(model, torch.randint(3, 100, (1, 40)))


def test_episode_caches_report_the_storage_they_keep_alive(epi):
    from tests.core.test_bytes_are_storage import reachable_storage

    for e in epi.episodes:
        held, reported = reachable_storage(e.cache), e.cache.nbytes()
        assert abs(held - reported) <= 0.02 * reported
