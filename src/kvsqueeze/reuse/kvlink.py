"""KVLink — "KVLink: Accelerating Large Language Models via Efficient KV Cache Reuse" (Yang et al., arXiv
2502.16002).

Each document's KV cache is computed alone (positions from 0, attending only to itself) and kept, e.g. in a
:mod:`kvsqueeze.store`; a request whose context is a sequence of documents concatenates their caches instead of
prefilling them, after *re-encoding positions*: every key is re-rotated to its global place in the concatenation
(RoPE being a rotation, a key at position ``p`` moves to ``p + offset`` by one more rotation of ``offset``). Values
need no change.

Deviation: the paper restores the attention *between* documents with trainable link tokens appended after each
document (the model is fine-tuned for them). Untrained, :func:`link` offers the issue's substitute instead:
``recompute=r`` recomputes the first ``r`` tokens of every document after the first with full attention over
everything before them (their keys and values are the ones a full prefill would give); ``recompute=0`` is
KVLink's re-positioning alone. Supported: full-attention models with RoPE over the whole head (the checks of
:mod:`kvsqueeze.schedules.rerotate`); documents are caches of method ``none`` holding one sequence each.
"""

from __future__ import annotations

import torch

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.compat import with_cache
from kvsqueeze.core.rope import rerope
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.schedules.rerotate import rope_of


@torch.no_grad()
def encode_document(model, token_ids: torch.Tensor) -> CompressedCache:
    """A document's own cache: ``token_ids [1, n]`` prefilled alone at positions ``0 … n-1`` (method ``none``)."""
    cache = CompressedCache(model, "none")
    cache.prefill(model, token_ids)
    return cache


def shift_keys(keys: torch.Tensor, offset: int, rope) -> torch.Tensor:
    """Post-RoPE ``keys [B, H, n, D]`` moved ``offset`` positions later (one more RoPE rotation, float32 math)."""
    if offset == 0:
        return keys
    inv, _ = rope
    B, H, n, D = keys.shape
    flat = keys.reshape(-1, D).float()
    positions = torch.full((flat.shape[0],), offset, dtype=torch.long, device=keys.device)
    return rerope(flat, positions, inv, 1.0).to(keys.dtype).view(B, H, n, D)


@torch.no_grad()
def link(model, documents: list[CompressedCache], recompute: int = 0) -> CompressedCache:
    """One uncompressed cache holding ``documents`` in order, keys re-encoded to their global positions; with
    ``recompute`` the first tokens of every later document are recomputed in context (see the module docstring).
    The result records the concatenated token ids, so ``model.generate`` over ``cat(document ids…, question)``
    prefills only the question."""
    if not documents:
        raise KVSqueezeError("kvlink needs at least one document cache")
    if recompute < 0:
        raise KVSqueezeError(f"recompute must be >= 0 tokens, got {recompute}")
    rope = rope_of(model)
    for doc in documents:
        if doc.method.spec() != "none" or doc.tokens is None or doc.tokens.shape[0] != 1:
            raise KVSqueezeError(
                "kvlink concatenates uncompressed caches of one document each: build them with "
                "kvsqueeze.reuse.kvlink.encode_document(model, ids)"
            )
    out = CompressedCache(model, "none")
    offset = 0
    tokens = []
    for i, doc in enumerate(documents):
        ids = doc.tokens
        n = ids.shape[-1]
        fresh = min(recompute, n) if i else 0
        if fresh:  # the boundary tokens, recomputed with full attention over the documents before them
            positions = torch.arange(offset, offset + fresh, device=model.device)[None]
            model(input_ids=ids[:, :fresh].to(model.device), position_ids=positions, **with_cache(model, out),
                  use_cache=True, logits_to_keep=1)  # fmt: skip
        for layer, source in zip(out.layers, doc.layers, strict=True):
            keys = shift_keys(source.keys[:, :, fresh:], offset, rope)
            layer.update(keys, source.values[:, :, fresh:])
        offset += n
        tokens.append(ids)
    out.tokens = torch.cat(tokens, dim=-1)
    return out
