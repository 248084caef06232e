"""SentenceKV: the units are the sentences of the text, selection ranks sentence vectors (mean keys) by the query,
every sentence fetched is exact attention; the hot budget through the cache; no syncs while decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvsqueeze import CompressedCache, KVSqueezeError, parse_method
from kvsqueeze.retrieval.sentencekv import SentenceKVBlock, sentence_units
from tests.bench.conftest import CharTokenizer
from tests.retrieval.helpers import context, generate, reference, tolerance

TEXT = 'The cat sat. "Who ran?" she asked!\nNew line here. 3.5 is a number. End'
SENTENCES = ["The cat sat.", ' "Who ran?"', " she asked!\n", "New line here.", " 3.5 is a number.", " End"]


def units_text(tok, ids, units) -> list[str]:
    return [tok.decode([ids[i] for i in np.flatnonzero(units == k)], skip_special_tokens=False)
            for k in range(int(units.max()) + 1)]  # fmt: skip


def test_units_are_the_sentences_of_the_text():
    tok = CharTokenizer()
    ids = tok.encode(TEXT)
    units = sentence_units(tok, ids, 64)
    assert units_text(tok, ids, units) == SENTENCES
    assert (np.diff(units) >= 0).all()  # contiguous runs of tokens
    # a sentence longer than max_sentence is cut into pieces of at most that many tokens
    pieces = units_text(tok, ids, sentence_units(tok, ids, 5))
    assert "".join(pieces) == TEXT and max(len(p) for p in pieces) == 5
    assert all(any(s.startswith(p) or p in s for s in SENTENCES) for p in pieces)


def test_units_with_the_embedded_tokenizer():
    from kvsqueeze.models import load_tokenizer

    tok = load_tokenizer()
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert units_text(tok, ids, sentence_units(tok, ids, 64)) == SENTENCES


def sentences_of(n_sentences: int, size: int, B: int = 2, H: int = 2, dim: int = 16, seed: int = 0, dtype=None):
    """``n_sentences`` sentences of ``size`` characters each (the first one shorter) and random keys/values."""
    tok = CharTokenizer()
    text = "".join(f"Sentence {chr(65 + i)}{'x' * (size - 12)}. " for i in range(n_sentences))[:-1]
    ids = torch.tensor([tok.encode(text)] * B)
    L = ids.shape[-1]
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B * H * L, dim, generator=g) * 0.3
    values = torch.randn(B * H * L, dim, generator=g)
    lengths = torch.full((B, H), L)
    return tok, ids, keys.to(dtype or torch.float32), values.to(dtype or torch.float32), lengths


def build(spec, tok, ids, keys, values, lengths, keep=None) -> SentenceKVBlock:
    """The block for ``spec`` (no sink unit unless the spec asks: the units are then exactly the sentences)."""
    if "sinks=" not in spec:
        spec += ("," if ":" in spec else ":") + "sinks=0"
    ctx = context(keys, lengths, keep)
    ctx.tokens, ctx.tokenizer = ids, tok
    return parse_method(spec).codec.encode(keys, values, lengths, ctx)


def test_vectors_are_the_mean_keys_of_each_sentence():
    tok, ids, keys, values, lengths = sentences_of(5, 20)
    block = build("sentencekv", tok, ids, keys, values, lengths)
    units = torch.from_numpy(sentence_units(tok, ids[0].tolist(), 64))
    assert block.sizes[0, 0].tolist() == torch.bincount(units).tolist() == [19, 20, 20, 20, 20]
    L = ids.shape[-1]
    for b in range(2):
        for h in range(2):
            seg = keys[(b * 2 + h) * L : (b * 2 + h + 1) * L]
            for s in range(5):
                torch.testing.assert_close(block.vectors[b, h, s], seg[units == s].mean(0), atol=1e-6, rtol=1e-5)


def test_selection_picks_the_sentence_with_the_planted_key():
    tok, ids, keys, values, lengths = sentences_of(6, 20, seed=1)
    L = ids.shape[-1]
    units = torch.from_numpy(sentence_units(tok, ids[0].tolist(), 64))
    direction = torch.zeros(16)
    direction[3] = 1.0
    planted = {(0, 0): 4, (0, 1): 1, (1, 0): 2, (1, 1): 5}  # a different sentence per (row, head)
    keys = keys.clone()
    for (b, h), s in planted.items():
        rows = (b * 2 + h) * L + torch.nonzero(units == s).flatten()
        keys[rows] += 3.0 * direction
    block = build("sentencekv:fetch=20", tok, ids, keys, values, lengths)  # room for exactly one sentence
    q = direction.expand(2, 2, 2, 16).clone()
    chosen = block.select(q)
    for (b, h), s in planted.items():
        assert chosen[b, h].tolist() == [i == s for i in range(6)], (b, h)
    index, ok = block.slots(chosen)
    for (b, h), s in planted.items():  # the fetched slots are exactly that sentence's tokens
        assert sorted(index[b, h][ok[b, h]].tolist()) == torch.nonzero(units == s).flatten().tolist()


def test_the_sinks_are_a_unit_fetched_first():
    tok, ids, keys, values, lengths = sentences_of(6, 20, seed=1)
    block = build("sentencekv:fetch=24,sinks=4", tok, ids, keys, values, lengths)  # the sinks and one sentence
    assert block.sink == 6 and block.sizes[..., 6].eq(4).all() and block.sizes[..., 0].eq(15).all()
    q = -block.vectors[:, :, :1].float() * 10  # a query turned away from the first sentence, which holds the sinks
    chosen = block.select(q)
    assert chosen[..., 6].all() and chosen.sum(-1).eq(2).all()
    index, ok = block.slots(chosen)
    assert all(set(range(4)) <= set(index[b, h][ok[b, h]].tolist()) for b in range(2) for h in range(2))


def test_selection_fills_the_budget_with_whole_sentences_in_rank_order():
    tok, ids, keys, values, lengths = sentences_of(6, 20, seed=2)
    block = build("sentencekv:fetch=50", tok, ids, keys, values, lengths)  # two sentences of 20 fit, not three
    q = torch.randn(2, 2, 3, 16, generator=torch.Generator().manual_seed(3))
    chosen = block.select(q)
    score = (q @ block.vectors.transpose(-1, -2)).amax(2)
    top2 = score.topk(2, dim=-1).indices
    assert chosen.sum(-1).eq(2).all()
    assert torch.equal(chosen, torch.zeros_like(chosen).scatter(-1, top2, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_every_sentence_fetched_is_exact_attention(dtype, tier, tmp_path):
    tok, ids, keys, values, lengths = sentences_of(5, 20, seed=4, dtype=dtype)
    spec = f"sentencekv:tier={tier}" + (f",dir={tmp_path}" if tier == "disk" else "")
    block = build(spec, tok, ids, keys, values, lengths)
    assert block.tokens_per_step == ids.shape[-1]  # no budget: every sentence each step
    q = torch.randn(2, 2, 3, 16, generator=torch.Generator().manual_seed(5)).to(dtype)
    out, lse = block.attend(q, 0.25)
    ref, ref_lse = reference(q, keys, values, lengths, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=tolerance(dtype), rtol=tolerance(dtype))
    torch.testing.assert_close(lse.double(), ref_lse, atol=tolerance(dtype), rtol=tolerance(dtype))
    k, v = block.materialize(dtype)
    assert torch.equal(k, keys) and torch.equal(v, values)


def test_fewer_sentences_differ_from_full_attention():
    tok, ids, keys, values, lengths = sentences_of(5, 20, seed=4)
    block = build("sentencekv:fetch=20", tok, ids, keys, values, lengths)
    q = torch.randn(2, 2, 3, 16, generator=torch.Generator().manual_seed(5))
    out, _ = block.attend(q, 0.25)
    ref, _ = reference(q, keys, values, lengths, 0.25)
    assert (out.double() - ref).abs().max() > 1e-3


PROSE = "".join(f"Line {i} says the word {chr(97 + i % 26) * 3} here. " for i in range(24))


def prompt(extra: str = "") -> torch.Tensor:
    return torch.tensor([CharTokenizer().encode(PROSE + extra)])


def test_budget_covering_everything_decodes_like_the_full_cache(model):
    ids = prompt()
    full = generate(model, CompressedCache(model, "none"), ids)
    cache = CompressedCache(model, "sentencekv", tokenizer=CharTokenizer())
    assert torch.equal(generate(model, cache, ids), full)
    assert cache.nbytes(tier="cold") > 0 and cache.fetch_meter.fetched_bytes > 0


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_ratio_bounds_what_is_hot(model, ratio):
    cache = CompressedCache(model, "sentencekv:residual=8", ratio=ratio, tokenizer=CharTokenizer())
    ids = prompt()
    cache.prefill(model, ids)
    block = cache.layers[0].blocks[0]
    assert block.sizes.shape[-1] == PROSE.count(". ") + 1  # one unit per sentence of the text, and the sinks
    full = cache.full_nbytes()
    hot = cache.nbytes(tier="hot") - cache.tokens.numel() * 8  # the prefilled token ids are the cache's
    generate(model, cache, prompt("Q"), n=1)
    per_step = cache.stats()["fetched_bytes_per_token"]
    slack = full / ids.shape[-1]  # the question token waits in the window beside it
    assert per_step > 0 and hot + per_step <= (1 - ratio) * full + slack, (hot, per_step, full)
    assert hot + per_step >= 0.8 * (1 - ratio) * full  # the budget is used
    assert cache.nbytes() == cache.nbytes(tier="hot") + cache.nbytes(tier="cold")


def test_eviction_then_sentences(model):
    cache = CompressedCache(model, "snapkv:window=8+sentencekv", ratio=0.5, tokenizer=CharTokenizer())
    generate(model, cache, prompt(), n=2)
    block = cache.layers[0].blocks[0]
    assert int(block.sizes.sum(-1).max()) <= prompt().shape[-1] // 2 + 1  # only the kept tokens are in sentences


def test_decode_steps_do_not_synchronise(model):
    from kvsqueeze.core.compat import with_cache
    from tests.core.test_decode_syncs import SyncCounter, step

    cache = CompressedCache(model, "sentencekv", ratio=0.5, tokenizer=CharTokenizer())
    ids = prompt()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), **with_cache(model, cache), use_cache=True)
        counter = SyncCounter()
        with counter:
            counter.active = True
            for token in torch.randint(1, 128, (4, 1, 1), generator=torch.Generator().manual_seed(1)):
                step(model, cache, token)
    assert cache.fetch_meter.fetched_bytes > 0
    assert not counter.calls, sorted(set(counter.calls))


@pytest.mark.parametrize(
    ("spec", "ratio", "tokenizer", "needle"),
    [
        ("sentencekv", None, False, "pass the tokenizer"),
        ("sentencekv:max_sentence=0", None, True, "max_sentence must be"),
        ("sentencekv", 0.99, True, "no room"),
        ("sentencekv:group=8", None, True, "drop group"),
    ],
)
def test_mistakes_are_one_line(model, spec, ratio, tokenizer, needle):
    with pytest.raises(KVSqueezeError, match=needle) as err:
        cache = CompressedCache(model, spec, ratio=ratio, tokenizer=CharTokenizer() if tokenizer else None)
        generate(model, cache, prompt(), n=1)
    assert "\n" not in str(err.value)
