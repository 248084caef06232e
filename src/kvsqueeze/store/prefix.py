"""Prefix reuse — the baseline every reuse paper compares with: a request whose prompt starts with a stored prefix
loads that prefix's cache and prefills only the rest.

With a compressing method what is stored is the *compressed* prefix (compressed once, when it was first
prefilled): the rest of the prompt is appended to it as any question is to a compressed context.
"""

from __future__ import annotations

import torch

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.store import Store


def reuse_prefix(
    store: Store,
    model,
    method,
    prompt_ids: torch.Tensor,
    *,
    prefix_length: int | None = None,
    ratio=None,
    budget: int | None = None,
    tokenizer=None,
) -> tuple[CompressedCache, int]:
    """``(cache, reused)``: a cache to pass to ``model.generate(prompt_ids, …)``.

    It holds the longest stored prefix of ``prompt_ids [1, L]`` (``reused`` tokens, nothing recomputed), or — when
    none is stored and ``prefix_length`` is given — the first ``prefix_length`` tokens prefilled (and compressed) now
    and stored for the next request (``reused`` = 0); otherwise an empty cache. ``generate`` then prefills only the
    tokens the cache does not hold.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise KVSqueezeError("prefix reuse serves one prompt at a time: give token ids of shape [1, L]")
    if prefix_length is not None and not 0 < prefix_length < prompt_ids.shape[-1]:
        raise KVSqueezeError(f"prefix_length must be in [1, {prompt_ids.shape[-1] - 1}], got {prefix_length}")
    found, length = store.longest_prefix(model, method, prompt_ids, tokenizer)
    if found is not None:
        cache = found.fork()
        cache.expect(prompt_ids)  # the prompt extends what the cache holds (checked against its token ids)
        return cache, length
    cache = CompressedCache(model, method, ratio=ratio, budget=budget, tokenizer=tokenizer)
    if prefix_length is not None:
        cache.prefill(model, prompt_ids[:, :prefix_length])
        store.save(cache, model)
        cache = cache.fork()
        cache.expect(prompt_ids)
    return cache, 0
