"""Prefill once, compress many times.

The prefill of a sample does not depend on the method (prefill attention is exact for every method), so the
harness runs it once with a recording attention function on a ``CompressedCache(model, "none")`` and keeps, per
layer, what the attention function saw: post-RoPE queries, keys and values, the mask, the scaling and the
position ids. :func:`build_cache` then makes each method's cache from those tensors exactly as the live forward
pass would have (``cache.compress_layer`` with the same arguments), and decoding continues with the model.
``tests/bench/test_capture.py`` proves that this equals compressing during the live forward pass.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from kvsqueeze.attention import NAME as KVSQUEEZE_ATTENTION
from kvsqueeze.attention import kvsqueeze_attention, register_attention
from kvsqueeze.cache import CompressedCache, CompressedLayer
from kvsqueeze.policies.base import PREFILL_MEMO
from kvsqueeze.spec import Method

CAPTURE = "kvsqueeze_bench_capture"
_RECORDS = threading.local()


@dataclass
class LayerCapture:
    queries: torch.Tensor  # [B, Hq, L, D] post-RoPE
    keys: torch.Tensor  # [B, H, L, D] what the cache returned (post-RoPE)
    values: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    position_ids: torch.Tensor | None
    module: object = None  # the attention module (decoding schedules' observe hooks read it)


@dataclass
class Prefill:
    """What one exact prefill produced: per-layer tensors and the logits of the last position."""

    layers: list[LayerCapture]
    last_logits: torch.Tensor  # [V]
    length: int
    seconds: float
    memo: dict = field(default_factory=dict)  # method-independent work shared by the caches built from it


def _capture_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    records = getattr(_RECORDS, "layers", None)
    if records is not None:
        records[module.layer_idx] = LayerCapture(
            query, key, value, attention_mask, scaling if scaling is not None else query.shape[-1] ** -0.5,
            kwargs.get("position_ids"), module,
        )  # fmt: skip
    return kvsqueeze_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@torch.no_grad()
def capture_prefill(model, input_ids: torch.Tensor) -> Prefill:
    """Run the exact prefill of ``input_ids [1, L]`` once and record every layer's attention inputs."""
    register_attention(CAPTURE, _capture_attention)
    cache = CompressedCache(model, "none")
    model.set_attn_implementation(CAPTURE)
    _RECORDS.layers = {}
    start = time.perf_counter()
    try:
        out = model(
            input_ids=input_ids.to(model.device),
            attention_mask=torch.ones_like(input_ids, device=model.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        records = _RECORDS.layers
    finally:
        _RECORDS.layers = None
        model.set_attn_implementation(KVSQUEEZE_ATTENTION)
    seconds = time.perf_counter() - start
    layers = [records[i] for i in range(len(cache.layers))]
    return Prefill(layers, out.logits[0, -1].float().cpu(), int(input_ids.shape[-1]), seconds)


@torch.no_grad()
def build_cache(model, prefill: Prefill, method: str | Method, ratio: float | None) -> CompressedCache:
    """The cache the live prefill would have left for ``method``, built from the captured tensors.

    While it is built, ``cache.shared_state[PREFILL_MEMO]`` holds ``prefill.memo``: scorers may keep there work that
    depends only on the captured tensors (``policies.base.prefill_memo``: H2O's accumulated attention, SnapKV's
    window votes), so every ratio and method built from this prefill reuses it.
    """
    cache = CompressedCache(model, method, ratio=ratio)
    cache.shared_state[PREFILL_MEMO] = prefill.memo
    decode_step = getattr(cache.method.schedule, "decode_step", None)  # decoding schedules see every pass
    for idx, layer in enumerate(cache.layers):
        cap = prefill.layers[idx]
        if isinstance(layer, CompressedLayer):
            layer.lazy_initialization(cap.keys, cap.values)
            layer.keys, layer.values, layer.seen = cap.keys, cap.values, cap.keys.shape[-2]
            if decode_step is not None:  # as kvsqueeze_attention does after the prefill pass
                start = time.perf_counter()
                decode_step(cache, layer, cap.module, cap.queries, cap.mask, cap.scaling, cap.position_ids)
                cache.compression_seconds += time.perf_counter() - start
            elif cache.wants_compression(layer, cap.queries.shape[2]):
                start = time.perf_counter()
                cache.compress_layer(layer, cap.queries, cap.mask, cap.scaling, cap.position_ids)
                cache.compression_seconds += time.perf_counter() - start
        else:  # sliding-window layers keep their window, as in the live pass
            layer.update(cap.keys, cap.values)
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
        past_key_values=cache,
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
