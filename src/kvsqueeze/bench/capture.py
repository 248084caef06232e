"""Prefill once, compress many times.

The prefill of a sample does not depend on the method (prefill attention is exact for every method), so the
harness runs it once on a ``CompressedCache(model, "none")`` whose ``attention_observer`` keeps, per layer, what the
attention call saw: post-RoPE queries, keys and values, the mask, the scaling and the position ids.
:func:`build_cache` then makes each method's cache from those tensors exactly as the live forward pass would have:
each layer's ``update`` with the captured keys and values, then the method's schedule (the one compression pipeline)
with the captured attention call. ``tests/bench/test_capture.py`` proves that this equals compressing live.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.compat import with_cache
from kvsqueeze.core.context import AttentionCall
from kvsqueeze.core.layer import CompressedLayer
from kvsqueeze.policies.base import PREFILL_MEMO
from kvsqueeze.spec import Method


@dataclass
class LayerCapture:
    call: AttentionCall  # module, post-RoPE queries [B, Hq, L, D], mask, scaling, position ids
    keys: torch.Tensor  # [B, H, L, D] what the cache returned (post-RoPE)
    values: torch.Tensor


@dataclass
class Prefill:
    """What one exact prefill produced: per-layer tensors and the logits of the last position."""

    layers: list[LayerCapture]
    last_logits: torch.Tensor  # [V]
    length: int
    seconds: float
    memo: dict = field(default_factory=dict)  # method-independent work shared by the caches built from it
    input_ids: torch.Tensor | None = None  # [1, L] the tokens prefilled (whole-context scorers read them)


@torch.no_grad()
def capture_prefill(model, input_ids: torch.Tensor) -> Prefill:
    """Run the exact prefill of ``input_ids [1, L]`` once and record every layer's attention inputs."""
    cache = CompressedCache(model, "none")
    records: dict[int, LayerCapture] = {}

    def record(layer_idx: int, call: AttentionCall, keys: torch.Tensor, values: torch.Tensor) -> None:
        records[layer_idx] = LayerCapture(call, keys, values)

    cache.attention_observer = record
    start = time.perf_counter()
    out = model(
        input_ids=input_ids.to(model.device),
        attention_mask=torch.ones_like(input_ids, device=model.device),
        **with_cache(model, cache),
        use_cache=True,
        logits_to_keep=1,
    )
    seconds = time.perf_counter() - start
    layers = [records[i] for i in range(len(cache.layers))]
    return Prefill(layers, out.logits[0, -1].float().cpu(), int(input_ids.shape[-1]), seconds,
                   input_ids=input_ids.detach().cpu())  # fmt: skip


@torch.no_grad()
def build_cache(model, prefill: Prefill, method: str | Method, ratio: float | None, tokenizer=None) -> CompressedCache:
    """The cache the live prefill would have left for ``method``, built from the captured tensors.

    While it is built, ``cache.shared_state[PREFILL_MEMO]`` holds ``prefill.memo``: scorers may keep there work that
    depends only on the captured tensors (``policies.base.prefill_memo``: H2O's accumulated attention, SnapKV's
    window votes, KVzip's reconstruction scores), so every ratio and method built from this prefill reuses it.
    """
    cache = CompressedCache(model, method, ratio=ratio, tokenizer=tokenizer)
    cache.tokens = prefill.input_ids  # known, as after CompressedCache.prefill
    cache.shared_state[PREFILL_MEMO] = prefill.memo
    for layer, cap in zip(cache.layers, prefill.layers, strict=True):
        layer.update(cap.keys, cap.values)  # what the live forward's update stores
        if isinstance(layer, CompressedLayer) and cache.compresses:
            start = time.perf_counter()
            cache.method.schedule.after_attention(cache, layer, cap.call)
            cache.compression_seconds += time.perf_counter() - start
    cache.shared_state.pop(PREFILL_MEMO, None)  # decoding-time recompressions see fresh tensors, never the memo
    return cache


@torch.no_grad()
def forward(model, cache: CompressedCache, ids: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """Append ``ids [1, n]`` to ``cache`` and return the logits ``[n or keep, V]`` (float32, on the CPU)."""
    past = cache.get_seq_length()
    ids = ids.to(model.device)
    out = model(
        input_ids=ids,
        attention_mask=torch.ones(1, past + ids.shape[-1], dtype=torch.long, device=model.device),
        **with_cache(model, cache),
        use_cache=True,
        logits_to_keep=keep,
    )
    return out.logits[0].float().cpu()


@dataclass
class Decoded:
    tokens: list[int]
    logits: list[torch.Tensor]
    seconds: float  # wall time of the decode forwards (after the first token)
    steps: int  # decode forwards run

    @property
    def tokens_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


@torch.no_grad()
def greedy(model, cache: CompressedCache, first_logits: torch.Tensor, max_new_tokens: int, eos: set[int],
           stop=None, keep_logits: bool = False) -> Decoded:  # fmt: skip
    """Greedy decoding as ``generate(do_sample=False)`` does it: the first token from the prefill's logits."""
    tokens: list[int] = []
    kept: list[torch.Tensor] = []
    logits = first_logits
    steps, start = 0, time.perf_counter()
    for step in range(max_new_tokens):
        if keep_logits:
            kept.append(logits)
        tok = int(logits.argmax())
        tokens.append(tok)
        if tok in eos or step == max_new_tokens - 1 or (stop is not None and stop(tokens)):
            break
        logits = forward(model, cache, torch.tensor([[tok]]), keep=1)[-1]
        steps += 1
    return Decoded(tokens, kept, time.perf_counter() - start, steps)


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    if ids is None:
        ids = getattr(tokenizer, "eos_token_id", None)
    if ids is None:
        return set()
    return {int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])}
