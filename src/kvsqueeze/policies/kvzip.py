"""KVzip — "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction" (Kim et al., arXiv 2505.23416).

A cache is good for *any* future question if the model can rebuild the context from it. After the context is
prefilled, KVzip runs a *reconstruction pass*: the model is prompted to repeat the context and teacher-forced on
the context tokens. Each context KV pair is scored by the largest attention it receives from the reconstruction
queries (max over the queries and over the query heads of its KV group); the lowest-scored pairs are evicted.
The reconstruction tokens never stay in the cache.

What the paper (and its reference code) does, and what this module implements:
- **Prompt** (:func:`reconstruction_chunks`): the context is split into chunks of ``chunk`` = 2000 tokens. The
  first chunk's input is ``"\\n\\nRepeat the previous context exactly."``, the chat template's end of the user turn
  and start of the assistant turn (``postfix``), then the chunk's tokens. Later chunks use
  ``"\\n\\nRepeat the part of the previous context exactly, starting with "`` followed by the last 8 tokens of the
  previous chunk, the postfix, then the chunk. Every chunk is a separate forward on the cache holding only the
  context (positions continue after the context; the chunk's KV is dropped after its pass), so memory stays
  bounded by one chunk.
- **Score** (:func:`reconstruction_scores`): softmax of each reconstruction query over the keys it is compared
  with, max over the queries of the chunk input (prompt included) and over the query heads of the KV group. In
  the reference code the softmax runs over the system-prompt keys, the KV *subchunk* being reconstructed and the
  chunk's own keys (causal) — ``scope="chunk"`` (default); ``scope="full"`` uses every context key instead (the
  attention the model really computes). Scores of tokens seen by several chunks are combined by a running max.
- **Budget** (``allocation="global"``, default): all scores of all layers and KV heads are ranked jointly and the
  ``layers × H × keep`` highest are kept — heads and layers get non-uniform, ragged budgets (``"layer"``: ranked
  jointly within each layer; ``"uniform"``: leave it to the budget axis, e.g. ``kvzip+pyramidkv``).
- **Context-independent head-level variant** (``level="head"``): a head's score is the maximum of its pair-level
  scores over the sequence, calibrated once per model (:func:`calibrate_kvzip_heads`); the highest-scored heads
  keep their whole cache, the others only the ``sinks`` — no reconstruction pass at inference.

The reconstruction pass runs inside the compression pipeline (:func:`reconstruction_pass`): KVzip is a
*whole-context* scorer, so the prefill schedule waits until every layer has attended over the context, then
:meth:`KVzip.prepare` replays each chunk through the cache (the model's own attention, nothing compressed, nothing
kept) and reduces every layer's scores from its attention call; the scores live until the last layer is
compressed. The chat template's head (system prompt) is found in the context and not repeated.
:func:`kvzip_scores_reference` computes the same scores with a plain ``DynamicCache`` and eager attention (ground
truth for tests). Needs the tokenizer (``CompressedCache(..., tokenizer=tok)``) and the context's token ids.

Sliding-window layers (Gemma-2/3, Mistral with a window) are not scored by the reconstruction: they keep their
newest tokens at the uniform budget (the window already bounds them), and the global ranking runs over the
full-attention layers.

Deviations: the first ``sinks`` tokens are protected (the paper protects the whole system prompt, which
kvsqueeze's context includes; pass its length as ``sinks`` to match); in the head-level variant the per-head
score is averaged over the calibration contexts (the paper uses one); batch rows are scored independently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch
from pydantic import Field

from kvsqueeze.calibration.store import model_key
from kvsqueeze.core.attention_math import (
    causal_partial_attention,
    fused_applies,
    fused_partial_attention,
    merge_partials,
)
from kvsqueeze.core.compat import with_cache
from kvsqueeze.core.context import SCRATCH, LayerContext
from kvsqueeze.data import essays
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.models import cache_dir, load_model
from kvsqueeze.policies.base import PREFILL_MEMO, PROTECTED, ContextHost, Scorer
from kvsqueeze.progress import NO_PROGRESS, Steps
from kvsqueeze.prompts import ids as text_ids
from kvsqueeze.spec import register

KVZIP_SCORES = "kvzip_scores"  # ctx.shared key: {layer_idx: [B, H, L] reconstruction scores} (the pipeline fills it)
FIRST_PROMPT = "\n\nRepeat the previous context exactly."
LATER_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "
CHUNK = 2000
OVERLAP = 8  # tokens of the previous chunk quoted in the next chunk's prompt
NO_TEMPLATE_POSTFIX = "\nAnswer:"  # what kvsqueeze's pipeline appends when a tokenizer has no chat template


# ---- the reconstruction prompt -----------------------------------------------------------------------------
@dataclass(frozen=True)
class RepeatPrompt:
    """Token ids ``[1, n]`` of the repeat prompts and of the chat template's user-turn end + assistant start."""

    first: torch.Tensor
    later: torch.Tensor
    postfix: torch.Tensor


def chat_template_parts(tokenizer) -> tuple[str, str]:
    """``(prefix, postfix)``: the chat template's text before and after a user message (a generation prompt
    follows); without a template, ``("", "\\nAnswer:")`` as kvsqueeze's pipeline does."""
    if not getattr(tokenizer, "chat_template", None):
        return "", NO_TEMPLATE_POSTFIX
    marker = "\x00KVZIP_MESSAGE\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    prefix, postfix = text.split(marker)
    return prefix, postfix


def repeat_prompt(tokenizer) -> RepeatPrompt:
    """The paper's repeat prompts tokenized for ``tokenizer`` (no special tokens added)."""

    return RepeatPrompt(
        text_ids(tokenizer, FIRST_PROMPT),
        text_ids(tokenizer, LATER_PROMPT),
        text_ids(tokenizer, chat_template_parts(tokenizer)[1]),
    )


@dataclass(frozen=True)
class ReconstructionChunk:
    """One reconstruction pass: teacher-forces context tokens ``[start, end)``; ``input_ids [1, n]`` ends with them."""

    start: int
    end: int
    input_ids: torch.Tensor

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[-1] - (self.end - self.start)


def reconstruction_chunks(
    context_ids: torch.Tensor, prompt: RepeatPrompt, chunk: int = CHUNK, start: int = 0, overlap: int = OVERLAP
) -> list[ReconstructionChunk]:
    """The paper's chunked reconstruction inputs for ``context_ids [1, L]`` (tokens before ``start``, e.g. the chat
    template's system prompt, are not repeated)."""
    if context_ids.dim() != 2 or context_ids.shape[0] != 1:
        raise KVSqueezeError("kvzip reconstructs one context at a time: pass context_ids of shape [1, L]")
    L = context_ids.shape[-1]
    if not 0 <= start < L:
        raise KVSqueezeError(f"kvzip: nothing to reconstruct (start {start} of a {L}-token context)")
    if chunk < 1:
        raise KVSqueezeError(f"kvzip: chunk must be >= 1 token, got {chunk}")
    device = context_ids.device
    out = []
    for i, begin in enumerate(range(start, L, chunk)):
        end = min(begin + chunk, L)
        if i == 0:
            head = prompt.first.to(device)
        else:
            head = torch.cat([prompt.later.to(device), context_ids[:, max(begin - overlap, start) : begin]], dim=-1)
        ids = torch.cat([head, prompt.postfix.to(device), context_ids[:, begin:end]], dim=-1)
        out.append(ReconstructionChunk(begin, end, ids))
    return out


def scored_columns(length: int, chunk: ReconstructionChunk, start: int, scope: str) -> torch.Tensor:
    """Context positions a chunk's softmax runs over: the un-repeated prefix ``[0, start)`` (the system prompt) and
    the subchunk ``[chunk.start, chunk.end)`` (``"chunk"``, the reference code's choice), or all (``"full"``)."""
    if scope == "full":
        return torch.arange(length)
    return torch.cat([torch.arange(start), torch.arange(chunk.start, chunk.end)])


# ---- the score ---------------------------------------------------------------------------------------------
def reconstruction_scores(
    queries: torch.Tensor,
    context_keys: torch.Tensor,
    chunk_keys: torch.Tensor,
    scaling: float,
    context_valid: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Max attention each context key receives from one reconstruction chunk: ``[B, H, L]``.

    ``queries [B, Hq, C, D]`` (post-RoPE), ``context_keys [B, H, L, D]``, ``chunk_keys [B, H, C, D]`` (the chunk's
    own keys; query ``i`` sees chunk keys ``0..i``). Softmax over context + visible chunk keys in float32; max over
    the ``C`` queries and the query heads of each KV group. ``block`` splits the queries (running max; same result,
    attention matrix bounded to ``block × (L + C)``)."""
    B, Hq, C, D = queries.shape
    H, L = context_keys.shape[1], context_keys.shape[2]
    G = Hq // H
    q = queries.float().view(B, H, G, C, D)
    kc = context_keys.float()[:, :, None]  # [B, H, 1, L, D]
    kn = chunk_keys.float()[:, :, None]  # [B, H, 1, C, D]
    hidden = None if context_valid is None else ~context_valid[:, None, None, None, :]
    best = torch.full((B, H, L), float("-inf"), device=queries.device)
    step = block or C
    for lo in range(0, C, step):
        qb = q[:, :, :, lo : lo + step]
        ctx_logits = (qb @ kc.transpose(-1, -2)) * scaling  # [B, H, G, b, L]
        if hidden is not None:
            ctx_logits = ctx_logits.masked_fill(hidden, float("-inf"))
        own = (qb @ kn.transpose(-1, -2)) * scaling  # [B, H, G, b, C]
        rows = torch.arange(lo, lo + qb.shape[3], device=queries.device)
        own = own.masked_fill(torch.arange(C, device=queries.device)[None, :] > rows[:, None], float("-inf"))
        lse = torch.logsumexp(torch.cat([ctx_logits, own], dim=-1), dim=-1, keepdim=True)
        probs = torch.exp(ctx_logits - lse)
        best = torch.maximum(best, probs.amax(dim=(2, 3)))
    return best.clamp(min=0.0)


def reconstruction_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    columns: torch.Tensor,
    softcap: float | None = None,
    block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's attention output and its KVzip scores: ``(out [B, C, Hq, Dv], scores [B, H, len(columns)])``.

    ``keys/values [B, H, L + C, D]`` hold the context then the chunk (query ``i`` sees the context and chunk keys
    ``0..i``; one row, no padding). The output is what the model's own attention computes (to float32 rounding); the
    scores are those of :func:`reconstruction_scores` restricted to ``columns`` of the context: each weight
    renormalised by the mass on ``columns`` and the chunk's own keys (``scope="chunk"``; with every context column
    that mass is 1, ``scope="full"``). Where PyTorch's fused attention kernel applies (the CPU, no soft-capping) the
    two attention partials come from it and the scores from one more ``q·kᵀ`` (:func:`split_reconstruction_
    attention`, about 2× faster on a CPU); elsewhere from one float32 softmax (:func:`softmax_reconstruction_
    attention`)."""
    q32, k32, v32 = queries.float(), keys.float(), values.float()
    if softcap is None and fused_applies(q32, k32, v32):
        out, scores = split_reconstruction_attention(q32, k32, v32, scaling, columns, block)
        return out.to(queries.dtype), scores
    return softmax_reconstruction_attention(queries, keys, values, scaling, columns, softcap, block)


def split_reconstruction_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    columns: torch.Tensor,
    block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reconstruction_attention` as two attention partials merged by log-sum-exp — the context (no mask) and
    the chunk (causal), each through :func:`fused_partial_attention` / :func:`causal_partial_attention` — and the
    scores ``exp(max over queries of (q·k − lse))`` over ``columns``, with ``lse`` the scope's normaliser (the
    context's for ``scope="full"``, that of the scored columns else, merged with the chunk's). No softmax over the
    whole ``[queries, L + C]`` logits; ``block`` query tokens (× groups) of logits at a time."""
    B, Hq, C, D = queries.shape
    H, total = keys.shape[1], keys.shape[2]
    L, G = total - C, Hq // H
    grouped = queries.reshape(B, H, G * C, D)  # rows (group, token): kv head h serves query heads h·G … h·G + G − 1
    context_part = fused_partial_attention(grouped, keys[:, :, :L], values[:, :, :L], scaling)
    chunk_out, chunk_lse = causal_partial_attention(
        queries, keys[:, :, L:].repeat_interleave(G, 1), values[:, :, L:].repeat_interleave(G, 1), scaling
    )
    chunk_lse = chunk_lse.reshape(B, H, G * C)
    mixed = merge_partials([context_part, (chunk_out.reshape(B, H, G * C, -1), chunk_lse)])
    out = mixed.view(B, Hq, C, -1).transpose(1, 2)
    cols = columns.to(queries.device)
    full = cols.numel() == L
    scored_t = (keys[:, :, :L] if full else keys[:, :, :L].index_select(2, cols)).transpose(-1, -2)
    scaled = grouped * scaling
    best = torch.full((B, H, cols.numel()), float("-inf"), device=queries.device)
    rows = max(block * G, 1)
    for lo in range(0, G * C, rows):
        logits = torch.matmul(scaled[:, :, lo : lo + rows], scored_t)  # [B, H, rows, len(columns)]
        scope_lse = context_part[1][..., lo : lo + rows] if full else torch.logsumexp(logits, dim=-1)
        norm = torch.logaddexp(scope_lse, chunk_lse[..., lo : lo + rows])
        best = torch.maximum(best, (logits - norm.unsqueeze(-1)).amax(dim=2))
    return out, best.exp()


def softmax_reconstruction_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    columns: torch.Tensor,
    softcap: float | None = None,
    block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reconstruction_attention` from one float32 softmax over every visible key, ``block`` queries at a
    time: it gives the attention output the next layer needs and, renormalised over ``columns``, the scores (one
    pass instead of the model's attention plus a second softmax for the scores; any device, soft-capping too)."""
    B, Hq, C, D = queries.shape
    H, total = keys.shape[1], keys.shape[2]
    L, G = total - C, Hq // H
    q = (queries.float() * scaling).view(B, H, G, C, D)
    k_t = keys.float().transpose(-1, -2)  # [B, H, D, L + C]: one matmul per KV head serves its G query heads
    v = values.float()
    cols = columns.to(queries.device)
    full = cols.numel() == L
    out = queries.new_empty(B, C, Hq, values.shape[-1], dtype=torch.float32)
    best = torch.zeros(B, H, cols.numel(), device=queries.device)
    for lo in range(0, C, block):
        qb = q[:, :, :, lo : lo + block]
        b = qb.shape[3]
        logits = torch.matmul(qb.reshape(B, H, G * b, D), k_t).view(B, H, G, b, total)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        rows = torch.arange(lo, lo + b, device=queries.device)
        future = torch.arange(C, device=queries.device)[None, :] > rows[:, None]  # [b, C]
        logits[..., L:].masked_fill_(future, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        mixed = torch.matmul(probs.view(B, H, G * b, total), v)  # [B, H, G * b, Dv]
        out[:, lo : lo + b] = mixed.view(B, Hq, b, -1).transpose(1, 2)
        picked = probs[..., :L] if full else probs[..., :L].index_select(-1, cols)
        if not full:  # the restricted softmax: renormalise by the mass on the scored columns and the chunk's keys
            picked = picked / (picked.sum(-1, keepdim=True) + probs[..., L:].sum(-1, keepdim=True)).clamp(min=1e-30)
        best = torch.maximum(best, picked.amax(dim=(2, 3)))
    return out.to(queries.dtype), best


def accumulate(total: torch.Tensor | None, scores: torch.Tensor, columns: torch.Tensor, length: int) -> torch.Tensor:
    """Running max across chunks: ``total [B, H, length]`` updated with ``scores [B, H, len(columns)]``."""
    if total is None:
        total = scores.new_zeros(*scores.shape[:2], length)
    columns = columns.to(scores.device)
    merged = torch.maximum(total.index_select(-1, columns), scores)
    return total.index_copy(-1, columns, merged)


# ---- the reference ----------------------------------------------------------------------------------------
def compressed_layers(config) -> list[int]:
    """Indices of the full-attention layers (the ones kvsqueeze compresses)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    return [i for i, kind in enumerate(types) if kind == "full_attention"]


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """The attention module of every decoder layer, by ``layer_idx``."""
    found = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if idx is not None and hasattr(module, "o_proj") and idx not in found:
            found[int(idx)] = module
    if not found:
        raise KVSqueezeError(f"kvzip: no attention modules with a layer_idx in {type(model).__name__}")
    return found


@torch.no_grad()
def kvzip_scores_reference(
    model,
    context_ids: torch.Tensor,
    chunk: int = CHUNK,
    *,
    prompt: RepeatPrompt,
    start: int = 0,
    scope: Literal["chunk", "full"] = "chunk",
    cache=None,
) -> dict[int, torch.Tensor]:
    """KVzip scores ``{layer: [1, H, L]}`` from a plain eager forward (the ground truth for the pipeline's pass).

    Prefills ``context_ids [1, L]`` into a ``DynamicCache`` (or uses ``cache``, already holding exactly the
    context), runs each reconstruction chunk with eager attention, reduces each layer's attention weights in a
    forward hook as soon as they exist (softmax renormalised over the chunk's columns for ``scope="chunk"``), and
    crops the cache back to the context after every chunk. The model's attention implementation is restored."""
    from transformers import DynamicCache

    chunks = reconstruction_chunks(context_ids, prompt, chunk, start)
    L = context_ids.shape[-1]
    layers = set(compressed_layers(model.config))
    modules = attention_modules(model)
    heads = model.config.get_text_config().num_key_value_heads
    totals: dict[int, torch.Tensor | None] = dict.fromkeys(layers)
    current: dict = {}

    def hook(module, args, kwargs, output):
        idx = int(module.layer_idx)
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if idx not in layers or weights is None:
            return
        part, columns = current["chunk"], current["columns"]
        C = part.input_ids.shape[-1]
        w = weights.float()  # [1, Hq, C, L + C]
        keep = torch.cat([columns.to(w.device), torch.arange(L, L + C, device=w.device)])
        w = w.index_select(-1, keep)
        w = w / w.sum(-1, keepdim=True).clamp(min=1e-30)  # softmax restricted to these keys
        score = w[..., : columns.numel()].view(1, heads, -1, C, columns.numel()).amax(dim=(2, 3))
        totals[idx] = accumulate(totals[idx], score, columns, L)

    previous = model.config._attn_implementation
    handles = []
    model.set_attn_implementation("eager")
    try:
        if cache is None:
            cache = DynamicCache()
            model(input_ids=context_ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        elif cache.get_seq_length() != L:
            raise KVSqueezeError(f"kvzip: the cache holds {cache.get_seq_length()} tokens, the context {L}")
        handles = [modules[i].register_forward_hook(hook, with_kwargs=True) for i in sorted(layers)]
        for part in chunks:
            current["chunk"], current["columns"] = part, scored_columns(L, part, start, scope)
            positions = torch.arange(L, L + part.input_ids.shape[-1], device=context_ids.device)[None]
            model(
                input_ids=part.input_ids,
                **with_cache(model, cache),
                use_cache=True,
                position_ids=positions,
                logits_to_keep=1,
            )
            cache.crop(-part.input_ids.shape[-1])
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)
    return {i: t for i, t in totals.items() if t is not None}


# ---- the pass through the cache -----------------------------------------------------------------------------
def template_head_length(tokens: torch.Tensor, tokenizer) -> int:
    """Length of the chat template's head (system prompt, user-turn start) when ``tokens [1, L]`` start with it,
    else 0: the part of the context KVzip does not ask the model to repeat."""
    head = chat_template_parts(tokenizer)[0]
    if not head:
        return 0
    ids = text_ids(tokenizer, head)
    n = ids.shape[-1]
    if 0 < n < tokens.shape[-1] and torch.equal(tokens[:, :n].cpu(), ids):
        return n
    return 0


def reconstruction_pass(host: ContextHost, chunk: int = CHUNK, scope: str = "chunk", block: int = 256):
    """KVzip scores ``{layer: [1, H, L]}`` of the context a cache holds uncompressed, from its own reconstruction
    pass: every chunk is replayed through the cache (:meth:`CompressedCache.replay`: positions continue after the
    context, nothing of the chunk stays). In each full-attention layer :func:`reconstruction_attention` gives both
    the attention output the next layer needs and the scores (``block`` queries at a time);
    layers with attention sinks keep the model's own attention and are scored from its queries and keys."""
    model, tokens, tokenizer = host.served_model(), host.tokens, host.tokenizer
    L = host.get_seq_length()
    if model is None:
        raise KVSqueezeError("kvzip: the model this cache was built for is gone")
    if tokenizer is None:
        raise KVSqueezeError(
            "kvzip's repeat prompt needs the tokenizer: CompressedCache(model, 'kvzip', tokenizer=tokenizer)"
        )
    if tokens is None or tokens.shape[-1] != L:
        raise KVSqueezeError(
            "kvzip needs the token ids of the context it compresses; prefill through cache.prefill(model, ids), "
            "kvsqueeze.pipeline or model.generate"
        )
    if tokens.shape[0] != 1:
        raise KVSqueezeError("kvzip reconstructs one context at a time: use one cache per sequence")
    start = template_head_length(tokens, tokenizer)
    layers = set(compressed_layers(model.config))
    totals: dict[int, torch.Tensor] = {}
    for part in reconstruction_chunks(tokens, repeat_prompt(tokenizer), chunk, start):
        cols = scored_columns(L, part, start, scope)
        fused: set[int] = set()

        def attend(idx, module, query, keys, values, mask, kwargs, cols=cols, fused=fused):
            """Full-attention layers: the attention output and the scores from one softmax."""
            if idx not in layers or kwargs.get("s_aux") is not None or kwargs.get("sliding_window"):
                return None  # the model's own attention; ``observe`` scores it from its queries and keys
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            out, s = reconstruction_attention(query, keys, values, scaling, cols, kwargs.get("softcap"), block)
            totals[idx] = accumulate(totals.get(idx), s, cols, L)
            fused.add(idx)
            return out, None

        def observe(idx, call, keys, values, cols=cols, fused=fused):
            if idx in layers and idx not in fused:
                context_keys = keys[:, :, :L].index_select(2, cols.to(keys.device))
                s = reconstruction_scores(call.queries, context_keys, keys[:, :, L:], call.scaling, block=block)
                totals[idx] = accumulate(totals.get(idx), s, cols, L)

        host.replay(model, part.input_ids, observe, attention=attend)
    return totals


# ---- budgets -----------------------------------------------------------------------------------------------
def global_counts(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The paper's non-uniform budget: the ``layers × H × keep[b]`` highest of ``scores [layers, B, H, L]`` (invalid
    tokens ``-inf``) ranked jointly over layers, heads and tokens; returns counts ``[layers, B, H]``. Ties: lower
    (layer, head, token) index first."""
    n_layers, B, H, L = scores.shape
    flat = scores.permute(1, 0, 2, 3).reshape(B, -1).float()
    available = (flat > float("-inf")).sum(-1)
    total = torch.minimum(n_layers * H * keep.to(flat.device), available)
    order = torch.argsort(flat, dim=-1, descending=True, stable=True)
    chosen = torch.arange(flat.shape[-1], device=flat.device)[None, :] < total[:, None]
    counts = torch.zeros(B, n_layers * H, dtype=torch.long, device=flat.device)
    counts.scatter_add_(1, order // L, chosen.long())
    return counts.view(B, n_layers, H).permute(1, 0, 2)


def head_level_counts(head_scores: torch.Tensor, keep: int, n: int, base: int) -> torch.Tensor:
    """Head-level eviction: every head keeps ``base`` tokens, then the highest-scored heads ``[layers, H]`` take
    their whole ``n`` tokens in turn until ``layers × H × keep`` are spent (the last one partially)."""
    base = min(base, n)
    if keep < base:
        raise KVSqueezeError(f"kvzip (head level) keeps {base} sink tokens per head but the budget is {keep}")
    extra = head_scores.numel() * (keep - base)
    order = torch.argsort(head_scores.flatten().float(), descending=True, stable=True)
    room = n - base
    before = torch.arange(order.numel()) * room  # extra tokens spent on better heads
    share = (extra - before).clamp(min=0, max=room)
    counts = torch.empty_like(share)
    counts[order] = share + base
    return counts.view(head_scores.shape)


# ---- head-level calibration --------------------------------------------------------------------------------
def heads_file(config) -> Path:
    """Where the head-level calibration of the model with ``config`` is cached."""

    return cache_dir() / "calibration" / model_key(SimpleNamespace(config=config)) / "kvzip_heads.json"


def head_scores_from_pairs(scores: dict[int, torch.Tensor], sinks: int) -> torch.Tensor:
    """Per-head score ``[layers, H]``: max over the sequence of the pair-level scores (sinks excluded)."""
    return torch.stack([s[0, :, sinks:].amax(-1) for _, s in sorted(scores.items())])


def calibrate_kvzip_heads(
    model: str | None = None, out: Path | None = None, texts: int = 2, tokens: int = 1024, sinks: int = 4,
    progress: Steps = NO_PROGRESS,
) -> Path:  # fmt: skip
    """Head-level KVzip scores for ``model`` (None = embedded SmolLM2) from ``texts`` essay contexts of ``tokens``
    tokens (the end of the essay collection, away from the benchmarks' start); written as JSON and cached."""

    net, tokenizer = load_model(model)
    prompt = repeat_prompt(tokenizer)
    config = net.config.get_text_config()
    progress.start("reconstruction passes", texts)
    per_text = []
    for i in range(texts):
        text = "\n\n".join(reversed(essays()[-(i + 1) * 4 : len(essays()) - i * 4]))
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :tokens].to(net.device)
        scores = kvzip_scores_reference(net, ids, prompt=prompt)
        per_text.append(head_scores_from_pairs(scores, sinks))
        progress.advance()
    head = torch.stack(per_text).mean(0)
    path = Path(out) if out is not None else heads_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"model": model or "embedded", "texts": texts, "tokens": tokens, "sinks": sinks}
    data |= {"layers": compressed_layers(config), "scores": head.tolist()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path


def load_head_scores(heads: str, config) -> tuple[list[int], torch.Tensor]:
    """``(layer indices, scores [layers, H])`` from a JSON path, or the cached calibration for ``config``."""
    if not heads and config is None:
        raise KVSqueezeError(
            "kvzip:level=head needs the model config or heads=PATH.json; use CompressedCache(model, ...)"
        )
    path = Path(heads).expanduser() if heads else heads_file(config)
    if not path.is_file():
        raise KVSqueezeError(
            f"no kvzip head calibration at {path}; run kvsqueeze.policies.kvzip.calibrate_kvzip_heads(MODEL) "
            "or pass heads=PATH.json"
        )
    try:
        data = json.loads(path.read_text())
        return [int(i) for i in data["layers"]], torch.tensor(data["scores"], dtype=torch.float32)
    except (ValueError, KeyError, TypeError):
        raise KVSqueezeError(f"{path} is not a kvzip head calibration; recalibrate it") from None


# ---- the scorer --------------------------------------------------------------------------------------------
@register
class KVzip(Scorer):
    name = "kvzip"
    family = "eviction"
    paper = "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"
    arxiv = "2505.23416"
    level: Literal["pair", "head"] = "pair"
    allocation: Literal["global", "layer", "uniform"] = "global"
    sinks: int = Field(4, ge=0)
    chunk: int = Field(CHUNK, ge=1)  # context tokens per reconstruction pass (read by the pipeline)
    scope: Literal["chunk", "full"] = "chunk"  # keys in the reconstruction softmax (read by the pipeline)
    heads: str = ""  # level=head: calibration JSON ('' = this model's cached calibration)

    def protected(self, length: int) -> int:
        return min(self.sinks, length)

    def _sinks(self, valid: torch.Tensor) -> torch.Tensor:
        return valid & (valid.long().cumsum(-1) <= self.sinks)

    def _finish(self, raw: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        score = raw.float().masked_fill(self._sinks(valid)[:, None, :], PROTECTED)
        return score.masked_fill(~valid[:, None, :], float("-inf"))

    @property
    def whole_context(self) -> bool:
        return self.level == "pair"  # the pair-level scores come from a pass over the whole prefilled context

    def attach(self, host: ContextHost, model) -> None:
        if self.level == "pair":
            if host.tokenizer is None:
                raise KVSqueezeError(
                    "kvzip's repeat prompt needs the tokenizer: CompressedCache(model, 'kvzip', tokenizer=tokenizer)"
                )
            host.follow_tokens(model)  # the reconstruction repeats the context's tokens

    def prepare(self, host: ContextHost) -> None:
        """Run the reconstruction pass (once per captured prefill in the benchmark) unless scores were given."""
        if self.level != "pair" or KVZIP_SCORES in host.shared_state:
            return
        memo = host.shared_state.get(PREFILL_MEMO)
        key = ("kvzip_scores", self.chunk, self.scope)
        scores = memo.get(key) if memo is not None else None
        if scores is None:
            scores = reconstruction_pass(host, self.chunk, self.scope)
            if memo is not None:
                memo[key] = scores
        host.shared_state.setdefault(SCRATCH, {})[KVZIP_SCORES] = scores  # dropped after the last layer

    def _pair_scores(self, ctx: LayerContext) -> dict[int, torch.Tensor]:
        scores = ctx.shared.get(KVZIP_SCORES, ctx.shared.get(SCRATCH, {}).get(KVZIP_SCORES))
        if scores is None:
            raise KVSqueezeError(
                "kvzip needs its reconstruction pass, which this pipeline did not run; use kvzip:level=head "
                "(calibrated, no pass) or expected_attention"
            )
        if ctx.layer_idx not in scores:
            raise KVSqueezeError(f"kvzip: no reconstruction scores for layer {ctx.layer_idx}")
        got = tuple(scores[ctx.layer_idx].shape)
        if got != (ctx.keys.shape[0], ctx.keys.shape[1], ctx.length):
            raise KVSqueezeError(
                f"kvzip: reconstruction scores of shape {got} do not match the layer's "
                f"{(ctx.keys.shape[0], ctx.keys.shape[1], ctx.length)} (batch, KV heads, tokens)"
            )
        return scores

    def _recency(self, ctx: LayerContext) -> torch.Tensor:
        return (ctx.valid.long().cumsum(-1) - 1).float()[:, None, :].expand(-1, ctx.keys.shape[1], -1)

    def _head_plan(self, ctx: LayerContext) -> tuple[list[int], torch.Tensor]:
        cached = ctx.state.get("kvzip_heads")
        if cached is None:
            layers, scores = load_head_scores(self.heads, ctx.shared.get("config"))
            if ctx.layer_idx not in layers or scores.shape[1] != ctx.keys.shape[1]:
                raise KVSqueezeError(
                    f"kvzip head calibration {self.heads or 'cached'!r} covers layers {layers} with "
                    f"{scores.shape[1]} KV heads; this is layer {ctx.layer_idx} with {ctx.keys.shape[1]}: recalibrate"
                )
            cached = ctx.state["kvzip_heads"] = (layers, scores)
        return cached

    def score(self, ctx: LayerContext) -> torch.Tensor:
        if ctx.sliding_window is not None:  # sliding-window layers keep their newest tokens (see the docstring)
            return self._finish(self._recency(ctx), ctx.valid)
        if self.level == "head":
            self._head_plan(ctx)
            return self._finish(self._recency(ctx), ctx.valid)
        return self._finish(self._pair_scores(ctx)[ctx.layer_idx].to(ctx.keys.device), ctx.valid)

    def counts(self, scores: torch.Tensor, keep_per_head: torch.Tensor, ctx: LayerContext) -> torch.Tensor | None:
        if ctx.sliding_window is not None:
            return None
        if self.level == "head":
            layers, head = self._head_plan(ctx)
            n_real = ctx.valid.sum(-1).tolist()
            rows = [
                head_level_counts(head, int(k), int(n), self.sinks)[layers.index(ctx.layer_idx)]
                for k, n in zip(keep_per_head.tolist(), n_real, strict=True)
            ]
            return torch.stack(rows).to(scores.device)
        if self.allocation == "uniform":
            return None
        if self.allocation == "layer":
            return global_counts(scores[None], keep_per_head)[0]
        return self._global_plan(ctx, keep_per_head)[ctx.layer_idx]

    def _global_plan(self, ctx: LayerContext, keep: torch.Tensor) -> dict[int, torch.Tensor]:
        """Counts of every scored layer from one joint ranking (computed once per cache and budget)."""
        pairs = self._pair_scores(ctx)
        memo_key = ("kvzip_plan", tuple(keep.tolist()), self.sinks)
        memo = ctx.scratch.get(memo_key)  # one compression pass: dropped after the last layer
        if memo is None or memo[0] is not pairs:
            order = sorted(pairs)
            stacked = torch.stack([self._finish(pairs[i].to(ctx.keys.device), ctx.valid) for i in order])
            counts = global_counts(stacked, keep)
            memo = ctx.scratch[memo_key] = (pairs, {i: counts[j] for j, i in enumerate(order)})
        return memo[1]
