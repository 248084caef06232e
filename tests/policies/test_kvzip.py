"""KVzip: reconstruction prompt and chunking, the max-attention score (pure function vs an eager reference), the
paper's global non-uniform budget, the head-level variant, and composition with codecs through CompressedCache."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvsqueeze import CompressedCache
from kvsqueeze.core.compat import passed_cache
from kvsqueeze.core.context import LayerContext
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policies.base import PROTECTED
from kvsqueeze.policies.kvzip import (
    FIRST_PROMPT,
    KVZIP_SCORES,
    LATER_PROMPT,
    KVzip,
    ReconstructionChunk,
    RepeatPrompt,
    accumulate,
    chat_template_parts,
    global_counts,
    head_level_counts,
    head_scores_from_pairs,
    kvzip_scores_reference,
    reconstruction_attention,
    reconstruction_chunks,
    reconstruction_pass,
    reconstruction_scores,
    repeat_prompt,
    scored_columns,
    softmax_reconstruction_attention,
    split_reconstruction_attention,
)
from tests.bench.conftest import CharTokenizer
from tests.conftest import tiny_model

PROMPT = RepeatPrompt(torch.tensor([[3, 4, 5]]), torch.tensor([[6, 7]]), torch.tensor([[8, 9]]))
EPS32 = torch.finfo(torch.float32).eps


class Chars(CharTokenizer):
    """One token per character, no chat template: the repeat prompt is the paper's text, character by character."""


def context(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(10, 128, (1, n), generator=torch.Generator().manual_seed(seed))


# ---- prompt and chunks -------------------------------------------------------------------------------------
def test_chunks_follow_the_papers_repeat_prompt():
    ids = context(45)
    chunks = reconstruction_chunks(ids, PROMPT, chunk=16, start=5, overlap=3)
    assert [(c.start, c.end) for c in chunks] == [(5, 21), (21, 37), (37, 45)]
    first, second = chunks[0].input_ids[0], chunks[1].input_ids[0]
    assert first.tolist() == [3, 4, 5, 8, 9, *ids[0, 5:21].tolist()]  # prompt, postfix, teacher-forced chunk
    quoted = ids[0, 18:21].tolist()  # the last `overlap` tokens of the previous chunk
    assert second.tolist() == [6, 7, *quoted, 8, 9, *ids[0, 21:37].tolist()]
    assert chunks[1].prompt_length == 7 and chunks[2].input_ids[0, -8:].tolist() == ids[0, 37:].tolist()
    assert len(reconstruction_chunks(ids, PROMPT, chunk=2000)) == 1


def test_chunk_arguments_are_checked():
    with pytest.raises(KVSqueezeError, match=r"\[1, L\]"):
        reconstruction_chunks(context(8).expand(2, -1), PROMPT)
    with pytest.raises(KVSqueezeError, match="nothing to reconstruct"):
        reconstruction_chunks(context(8), PROMPT, start=8)


@pytest.mark.model
def test_repeat_prompt_matches_the_pipelines_chat_template(smollm2):
    _, tokenizer = smollm2
    prompt = repeat_prompt(tokenizer)
    assert tokenizer.decode(prompt.first[0]) == FIRST_PROMPT
    assert tokenizer.decode(prompt.later[0]) == LATER_PROMPT
    from kvsqueeze.prompts import prompt_ids

    prefix, postfix = chat_template_parts(tokenizer)
    head, tail = prompt_ids(tokenizer, "CONTEXT", "QUESTION")
    assert tokenizer.decode(head[0]) == prefix + "CONTEXT"
    assert tokenizer.decode(tail[0]).endswith(postfix) and postfix.startswith("<|im_end|>")


# ---- the score ---------------------------------------------------------------------------------------------
def test_score_is_max_softmax_weight_over_queries_and_group():
    """From scratch, one query at a time: softmax over context + causal chunk keys, max over queries and group."""
    g = torch.Generator().manual_seed(1)
    B, H, G, C, L, D = 1, 2, 3, 5, 9, 8
    q = torch.randn(B, H * G, C, D, generator=g)
    kc, kn = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, C, D, generator=g)
    got = reconstruction_scores(q, kc, kn, D**-0.5)
    want = torch.zeros(B, H, L)
    for h in range(H * G):
        for i in range(C):
            keys = torch.cat([kc[0, h // G], kn[0, h // G, : i + 1]])
            p = torch.softmax(keys @ q[0, h, i] * D**-0.5, 0)[:L]
            want[0, h // G] = torch.maximum(want[0, h // G], p)
    assert torch.allclose(got, want, atol=8 * EPS32)


def test_query_blocks_equal_one_block():
    """Chunked scoring (queries in blocks, running max) equals unchunked scoring."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 23, 8, generator=g)
    kc, kn = torch.randn(2, 2, 30, 8, generator=g), torch.randn(2, 2, 23, 8, generator=g)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :4] = False
    whole = reconstruction_scores(q, kc, kn, 0.3, valid)
    blocked = reconstruction_scores(q, kc, kn, 0.3, valid, block=5)
    assert torch.allclose(whole, blocked, atol=8 * EPS32)
    assert (whole[1, :, :4] == 0).all()


@pytest.mark.parametrize("scope", ["chunk", "full"])
@pytest.mark.parametrize(
    "attention", [softmax_reconstruction_attention, split_reconstruction_attention, reconstruction_attention]
)
def test_fused_attention_gives_the_models_output_and_the_same_scores(scope, attention):
    """The chunk's attention output (= SDPA over context + causal chunk) and the scores (= :func:`reconstruction_
    scores`, the restricted softmax for ``scope="chunk"``): from one softmax, from the fused kernel's two partials
    and their log-sum-exps, and through the dispatcher."""
    g = torch.Generator().manual_seed(11)
    B, H, G, L, C, D = 1, 2, 3, 24, 10, 16
    q = torch.randn(B, H * G, C, D, generator=g)
    keys, values = torch.randn(B, H, L + C, D, generator=g), torch.randn(B, H, L + C, D, generator=g)
    part = ReconstructionChunk(8, 16, torch.zeros(1, C, dtype=torch.long))
    cols = scored_columns(L, part, 3, scope)
    out, scores = attention(q, keys, values, 0.25, cols, block=4)
    mask = torch.ones(C, L + C, dtype=torch.bool)
    mask[:, L:] = torch.ones(C, C, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(
        q, keys.repeat_interleave(G, 1), values.repeat_interleave(G, 1), attn_mask=mask, scale=0.25
    )
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=8 * EPS32, atol=8 * EPS32)
    ref = reconstruction_scores(q, keys[:, :, :L][:, :, cols], keys[:, :, L:], 0.25)
    torch.testing.assert_close(scores, ref, rtol=8 * EPS32, atol=8 * EPS32)


def test_running_max_across_chunks():
    total = accumulate(None, torch.tensor([[[0.2, 0.5]]]), torch.tensor([1, 3]), 4)
    total = accumulate(total, torch.tensor([[[0.4, 0.1]]]), torch.tensor([0, 1]), 4)
    assert torch.equal(total, torch.tensor([[[0.4, 0.2, 0.0, 0.5]]]))


def capture_layer(model, layer: int, store: list):
    """Forward hook computing the post-RoPE queries and the cache's keys of one attention module."""
    attn = model.model.layers[layer].self_attn

    def hook(module, args, kwargs, output):
        h = kwargs["hidden_states"]
        q = module.q_proj(h).view(*h.shape[:-1], -1, module.head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        q = apply_rotary_pos_emb(q, q, cos, sin)[0]
        keys = passed_cache(kwargs).layers[layer].keys
        store.append((q, keys, module.scaling))

    return attn.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scope", ["chunk", "full"])
def test_pure_function_matches_the_eager_reference(dtype, scope):
    """Chunk by chunk, queries and keys captured from a plain forward, scored by the pure function and combined by
    running max, equal the reference's hook-reduced eager attention weights on every layer."""
    model = tiny_model("llama").to(dtype)
    ids, start, chunk = context(50, seed=3), 6, 16
    ref = kvzip_scores_reference(model, ids, chunk, prompt=PROMPT, start=start, scope=scope)
    L = ids.shape[-1]
    for layer in range(2):
        cache = DynamicCache()
        model(input_ids=ids, past_key_values=cache)
        total = None
        for part in reconstruction_chunks(ids, PROMPT, chunk, start):
            store = []
            handle = capture_layer(model, layer, store)
            C = part.input_ids.shape[-1]
            model(input_ids=part.input_ids, past_key_values=cache, position_ids=torch.arange(L, L + C)[None])
            handle.remove()
            cache.crop(-C)
            q, keys, scaling = store[0]
            cols = scored_columns(L, part, start, scope)
            total = accumulate(total, reconstruction_scores(q, keys[:, :, cols], keys[:, :, L:], scaling), cols, L)
        tol = 4 * torch.finfo(dtype).eps  # the reference's weights are rounded to the model dtype
        assert torch.allclose(ref[layer], total, atol=tol, rtol=tol), (ref[layer] - total).abs().max()


def test_reference_leaves_the_cache_at_the_context_and_restores_attention():
    model = tiny_model("llama")
    ids = context(40, seed=4)
    cache = DynamicCache()
    model(input_ids=ids, past_key_values=cache)
    before = [layer.keys.clone() for layer in cache.layers]
    scores = kvzip_scores_reference(model, ids, 12, prompt=PROMPT, cache=cache)
    assert cache.get_seq_length() == 40
    assert all(torch.equal(a, layer.keys) for a, layer in zip(before, cache.layers, strict=True))
    assert model.config._attn_implementation == "sdpa"
    assert set(scores) == {0, 1} and scores[0].shape == (1, 2, 40)
    assert (scores[0] > 0).all() and (scores[0] <= 1).all()
    with pytest.raises(KVSqueezeError, match="holds 40 tokens"):
        kvzip_scores_reference(model, ids[:, :30], prompt=PROMPT, cache=cache)
    assert model.config._attn_implementation == "sdpa"


# ---- budgets -----------------------------------------------------------------------------------------------
def test_global_budget_ranks_all_layers_and_heads_jointly():
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(3, 2, 2, 10, generator=g)  # [layers, B, H, L]
    scores[..., 0] = PROTECTED
    scores[:, 1, :, :3] = float("-inf")  # left padding of row 1
    scores[:, 1, :, 3] = PROTECTED
    keep = torch.tensor([4, 3])
    counts = global_counts(scores, keep)
    assert counts.sum(dim=(0, 2)).tolist() == [3 * 2 * 4, 3 * 2 * 3]
    for b in range(2):
        flat = scores[:, b].flatten()
        threshold = flat.sort(descending=True).values[3 * 2 * int(keep[b]) - 1]
        assert torch.equal(counts[:, b], (scores[:, b] >= threshold).sum(-1))  # no ties in random data
    assert (counts >= 1).all()  # protected tokens always win
    assert len(set(counts.flatten().tolist())) > 1  # non-uniform


def test_global_budget_breaks_ties_by_index():
    scores = torch.ones(2, 1, 2, 4)
    counts = global_counts(scores, torch.tensor([2]))
    assert counts[:, 0].tolist() == [[4, 4], [0, 0]]


def test_head_level_counts_give_whole_heads_to_the_best():
    head = torch.tensor([[0.9, 0.1], [0.5, 0.7]])
    counts = head_level_counts(head, keep=10, n=20, base=4)
    assert counts.sum() == 40 and counts.tolist() == [[20, 4], [4, 12]]
    with pytest.raises(KVSqueezeError, match="sink"):
        head_level_counts(head, keep=2, n=20, base=4)


# ---- through the cache -------------------------------------------------------------------------------------
def kvzip_cache(model, ids, spec, ratio, **kw):
    scores = kvzip_scores_reference(model, ids, 16, prompt=PROMPT, **kw)
    cache = CompressedCache(model, spec, ratio=ratio, tokenizer=Chars())
    cache.shared_state[KVZIP_SCORES] = scores
    cache.prefill(model, ids)
    return cache, scores


def test_kvzip_keeps_the_global_top_scores_through_the_cache():
    model = tiny_model("llama")
    ids = context(48, seed=6)
    cache, scores = kvzip_cache(model, ids, "kvzip", 0.75)
    kept = cache.stats()["tokens_kept"]
    total = sum(x for rows in kept.values() for heads in rows for x in heads)
    assert total == 2 * 2 * 12  # layers × H × keep, ragged
    per_head = [x for rows in kept.values() for heads in rows for x in heads]
    assert len(set(per_head)) > 1
    stacked = torch.stack([scores[i] for i in (0, 1)])
    stacked[..., :4] = PROTECTED
    want = global_counts(stacked, torch.tensor([12]))
    assert [kept[i][0] for i in (0, 1)] == want[:, 0].tolist()


@pytest.mark.parametrize("spec", ["kvzip+kivi:bits=4", "kvzip:allocation=layer", "kvzip:allocation=uniform+adakv"])
def test_kvzip_composes_with_codecs_and_budgets(spec):
    model = tiny_model("llama")
    ids = context(48, seed=7)
    cache, _ = kvzip_cache(model, ids, spec, 0.5)
    stats = cache.stats()
    kept = [x for rows in stats["tokens_kept"].values() for heads in rows for x in heads]
    assert sum(kept) == len(kept) * 24
    assert stats["cache_bytes"] < stats["full_cache_bytes"]
    out = model.generate(ids, past_key_values=cache.fork(), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 51)


def test_kvzip_on_gemma3_scores_full_attention_layers_only():
    model = tiny_model("gemma3")
    ids = context(40, seed=8)
    cache, scores = kvzip_cache(model, ids, "kvzip", 0.5)
    assert set(scores) == {1, 3}
    kept = cache.stats()["tokens_kept"]
    assert sum(kept[i][0][0] for i in (1, 3)) == 2 * 1 * 20  # the global ranking spans the full-attention layers
    # sliding layers keep the newest half of the 7 tokens their window still shows (window 8), uniform budget
    assert [kept[i][0][0] for i in (0, 2)] == [4, 4]


def test_the_live_pass_equals_the_eager_reference_and_leaves_no_trace():
    """The pass through the cache (the model's own sdpa attention, replayed chunk by chunk) gives the eager
    reference's scores; every layer holds the same tensors afterwards."""
    model, tok = tiny_model("llama"), Chars()
    ids = context(50, seed=3)
    host = CompressedCache(model, "none", tokenizer=tok)
    host.prefill(model, ids)
    before = [(layer.keys, layer.values, layer.seen) for layer in host.layers]
    for scope in ("chunk", "full"):
        live = reconstruction_pass(host, chunk=16, scope=scope, block=5)
        ref = kvzip_scores_reference(model, ids, 16, prompt=repeat_prompt(tok), scope=scope)
        # different kernels (sdpa here, eager weights in the reference) round differently: a few float32 eps
        tol = 4 * EPS32
        assert set(live) == {0, 1} and all(torch.allclose(live[i], ref[i], atol=tol, rtol=tol) for i in (0, 1))
    after = [(layer.keys, layer.values, layer.seen) for layer in host.layers]
    assert all(a[0] is b[0] and a[1] is b[1] and a[2] == b[2] == 50 for a, b in zip(before, after, strict=True))
    assert host.get_seq_length() == 50 and host.attention_observer is None and not host.replaying


def test_kvzip_compresses_with_its_own_pass_live_and_in_generate():
    """Prefill and ``model.generate`` both run the pass: the kept counts are the global top of the pass's scores
    (the same computation on an uncompressed cache), and the reconstruction tokens never stay."""
    model, tok = tiny_model("llama"), Chars()
    ids = context(48, seed=6)
    host = CompressedCache(model, "none", tokenizer=tok)
    host.prefill(model, ids)
    stacked = torch.stack([s for _, s in sorted(reconstruction_pass(host, chunk=16).items())])
    stacked[..., :4] = PROTECTED
    want = global_counts(stacked, torch.tensor([12]))[:, 0].tolist()
    cache = CompressedCache(model, "kvzip:chunk=16", ratio=0.75, tokenizer=tok)
    cache.prefill(model, ids)
    kept = cache.stats()["tokens_kept"]
    assert [kept[i][0] for i in (0, 1)] == want and cache.get_seq_length() == 48
    assert set(cache.shared_state) == {"config"}  # the scores and the joint ranking went with the prefill
    live = CompressedCache(model, "kvzip:chunk=16", ratio=0.75, tokenizer=tok)
    out = model.generate(ids, past_key_values=live, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 51) and live.get_seq_length() == 50  # prompt + the 2 tokens fed back
    # generate's prefill runs with an attention mask (another code path than prefill's): the budget is exact, the
    # per-head split may differ only where near-equal scores straddle the global threshold
    held = [h - 2 for rows in live.stats()["tokens_kept"].values() for h in rows[0]]
    assert sum(held) == 2 * 2 * 12 and max(abs(a - b) for a, b in zip(held, [*want[0], *want[1]], strict=True)) <= 1
    assert torch.equal(live.tokens, out[:, :50])  # the cache followed generate's tokens
    gone = [weakref.ref(live), weakref.ref(cache)]
    del live, cache
    assert all(ref() is None for ref in gone) and not model._forward_pre_hooks  # their token hooks went with them


def test_kvzip_refuses_what_its_pass_cannot_do():
    model = tiny_model("llama")
    with pytest.raises(KVSqueezeError, match="needs the tokenizer"):
        CompressedCache(model, "kvzip", ratio=0.5)
    cache = CompressedCache(model, "kvzip", ratio=0.5, tokenizer=Chars())
    embeds = model.get_input_embeddings()(context(20))
    with pytest.raises(KVSqueezeError, match="token ids of the context"):
        model(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
    cache = CompressedCache(model, "kvzip", ratio=0.5, tokenizer=Chars())
    with pytest.raises(KVSqueezeError, match="one context at a time"):
        cache.prefill(model, torch.cat([context(20), context(20, seed=1)]))


def test_kvzip_rejects_scores_of_another_context():
    model = tiny_model("llama")
    scores = kvzip_scores_reference(model, context(30), prompt=PROMPT)
    cache = CompressedCache(model, "kvzip", ratio=0.5, tokenizer=Chars())
    cache.shared_state[KVZIP_SCORES] = scores
    with pytest.raises(KVSqueezeError, match="do not match"):
        cache.prefill(model, context(20))


def test_head_level_variant_keeps_whole_heads(tmp_path):
    model = tiny_model("llama")
    calib = kvzip_scores_reference(model, context(40, seed=9), prompt=PROMPT)
    head = head_scores_from_pairs(calib, sinks=4)
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"layers": [0, 1], "scores": head.tolist()}))
    ids = context(32, seed=10)
    cache = CompressedCache(model, f"kvzip:level=head,heads={path}", ratio=0.5)
    cache.prefill(model, ids)  # no reconstruction pass needed
    kept = torch.tensor([cache.stats()["tokens_kept"][i][0] for i in (0, 1)])
    assert kept.sum() == 2 * 2 * 16
    assert torch.equal(kept, head_level_counts(head, 16, 32, 4))
    best = head.flatten().argmax()
    assert kept.flatten()[best] == 32 and kept.min() == 4


def test_head_level_variant_without_calibration_says_so(tmp_path):
    model = tiny_model("llama")
    cache = CompressedCache(model, f"kvzip:level=head,heads={tmp_path / 'missing.json'}", ratio=0.5)
    with pytest.raises(KVSqueezeError, match="calibrate_kvzip_heads"):
        cache.prefill(model, context(20))


def test_scorer_marks_sinks_and_padding():
    ctx = LayerContext(0, 1, torch.zeros(1, 1, 6, 4), torch.zeros(1, 1, 6, 4), None, torch.ones(1, 6).bool(), 0.5)
    ctx.valid[0, 0] = False
    ctx.shared[KVZIP_SCORES] = {0: torch.full((1, 1, 6), 0.3)}
    score = KVzip(sinks=2).score(ctx)[0, 0]
    assert torch.isneginf(score[0]) and (score[1:3] == PROTECTED).all() and (score[3:] == 0.3).all()
