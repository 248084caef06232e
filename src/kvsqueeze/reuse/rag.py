"""Retrieval-augmented prompts served from caches computed before: the common ground of the reuse methods.

A :class:`Request` is a prompt in pieces (:func:`kvsqueeze.prompts.segmented_prompt`): the chat template's head,
the documents, the question's tail. :class:`ChunkCaches` keeps each document's cache in a
:class:`~kvsqueeze.store.Store` — computed alone (KVLink, Cache-Craft, KVShare) or after the shared head (APE) — and
counts hits, misses and the seconds spent encoding and loading. A *reuse strategy* turns a request and the chunk
caches into a cache holding the whole context, and says how many context tokens it computed for this request;
``model.generate`` (or the bench) then prefills the tail only. :func:`parse_reuse` reads a spec such as
``kvlink:recompute=16``; :data:`STRATEGIES` lists them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.compat import with_cache
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.reuse import ape, cachecraft, kvlink, kvshare
from kvsqueeze.spec import split_params
from kvsqueeze.store import Store, cache_key


@dataclass(frozen=True)
class Request:
    head: torch.Tensor  # [1, h] the template before the documents: the shared prefix
    documents: tuple[torch.Tensor, ...]  # [1, n_i] each, tokenized alone
    tail: torch.Tensor  # [1, t] the question, the template's end and the answer prefix

    @property
    def context_ids(self) -> torch.Tensor:
        return torch.cat([self.head, *self.documents], dim=-1)

    @property
    def prompt_ids(self) -> torch.Tensor:
        return torch.cat([self.context_ids, self.tail], dim=-1)

    @property
    def boundaries(self) -> list[int]:
        """Context lengths after the head and after each document."""
        out = [self.head.shape[-1]]
        for doc in self.documents:
            out.append(out[-1] + doc.shape[-1])
        return out


@dataclass
class ChunkCaches:
    """Chunk caches (method ``none``) in ``store``, loaded when there and encoded (then stored) when not."""

    store: Store
    model: object
    hits: int = 0
    misses: int = 0
    encode_seconds: float = 0.0
    load_seconds: float = 0.0
    pause: float = field(default=0.0)  # seconds spent on bookkeeping that a request's time to first token excludes

    def _get(self, ids: torch.Tensor, build) -> CompressedCache:
        key = cache_key(self.model, "none", ids)
        start = time.perf_counter()
        cache = self.store.load(key, self.model)
        if cache is not None:
            self.hits += 1
            self.load_seconds += time.perf_counter() - start
            return cache
        self.misses += 1
        start = time.perf_counter()
        cache = build()
        self.encode_seconds += time.perf_counter() - start
        self.save(cache, ids)
        return cache

    def save(self, cache: CompressedCache, ids: torch.Tensor) -> None:
        """Store ``cache`` of ``ids`` (its time is bookkeeping, not the request's)."""
        start = time.perf_counter()
        self.store.save(cache, self.model, token_ids=ids)
        self.pause += time.perf_counter() - start

    def alone(self, ids: torch.Tensor) -> CompressedCache:
        """The cache of ``ids [1, n]`` encoded alone at positions ``0 … n-1``."""
        return self._get(ids, lambda: kvlink.encode_document(self.model, ids))

    def after(self, head: torch.Tensor, ids: torch.Tensor) -> CompressedCache:
        """The cache of ``head`` followed by ``ids`` (APE's context encoded after the shared prefix)."""
        both = torch.cat([head, ids], dim=-1)
        return self._get(both, lambda: ape.encode_contexts(self.model, head, [ids])[1][0])

    def warm(self, request: Request, strategy: Strategy) -> None:
        """Encode (untimed) the chunks ``strategy`` reads for ``request``, so its timing finds them stored."""
        strategy.warm(request, self)


@dataclass
class Reused:
    cache: CompressedCache  # holds the whole context of the request
    recomputed: int  # context tokens computed for this request (0: everything reused)


class Strategy(Protocol):
    name: str

    def build(self, model, request: Request, chunks: ChunkCaches) -> Reused: ...

    def warm(self, request: Request, chunks: ChunkCaches) -> None: ...


def truncated(model, cache: CompressedCache, length: int) -> CompressedCache:
    """A new uncompressed cache holding copies of the first ``length`` positions of ``cache`` (method ``none``)."""
    out = CompressedCache(model, "none")
    for mine, theirs in zip(out.layers, cache.layers, strict=True):
        mine.update(theirs.keys[:, :, :length].clone(), theirs.values[:, :, :length].clone())
    out.tokens = cache.tokens[:, :length].clone()
    return out


@dataclass
class PrefixReuse:
    """The baseline: the longest stored prefix of the context (cut at document boundaries) is loaded and the rest
    prefilled in one forward; every boundary prefix of this request is then stored for later ones (copies, not
    counted in its time)."""

    name: str = "prefix"

    def build(self, model, request: Request, chunks: ChunkCaches) -> Reused:
        context = request.context_ids
        found, length = chunks.store.longest_prefix(model, "none", torch.cat([context, request.tail[:, :1]], -1))
        cache = found if found is not None else CompressedCache(model, "none")
        chunks.hits += found is not None
        if length < context.shape[-1]:  # the rest of the context in one forward, as a serving engine prefills it
            model(input_ids=context[:, length:].to(model.device), **with_cache(model, cache), use_cache=True,
                  logits_to_keep=1)  # fmt: skip
        cache.tokens = context.cpu()
        start = time.perf_counter()
        for end in request.boundaries:
            if end > length:
                prefix = truncated(model, cache, end)
                chunks.store.save(prefix, model, token_ids=context[:, :end])
        chunks.pause += time.perf_counter() - start
        return Reused(cache, context.shape[-1] - length)

    def warm(self, request: Request, chunks: ChunkCaches) -> None:
        return None  # a prefix cache exists only if an earlier request had the same first documents


@dataclass
class KVLinkReuse:
    """KVLink: the head and every document encoded alone, keys re-encoded to their global positions; ``recompute``
    tokens at the start of each document recomputed in context (:mod:`kvsqueeze.reuse.kvlink`)."""

    recompute: int = 0
    name: str = "kvlink"

    def build(self, model, request: Request, chunks: ChunkCaches) -> Reused:
        parts = [chunks.alone(request.head), *(chunks.alone(d) for d in request.documents)]
        cache = kvlink.link(model, parts, recompute=self.recompute)
        return Reused(cache, sum(min(self.recompute, d.shape[-1]) for d in request.documents))

    def warm(self, request: Request, chunks: ChunkCaches) -> None:
        for ids in (request.head, *request.documents):
            chunks.alone(ids)


@dataclass
class APEReuse:
    """APE: every document encoded after the shared head, combined with its temperature and scale
    (:mod:`kvsqueeze.reuse.ape`)."""

    temperature: float = ape.TEMPERATURE
    scale: float = ape.SCALE
    name: str = "ape"

    def build(self, model, request: Request, chunks: ChunkCaches) -> Reused:
        prefix = chunks.alone(request.head)
        encoded = [chunks.after(request.head, d) for d in request.documents]
        return Reused(ape.combine(model, prefix, encoded, self.temperature, self.scale), 0)

    def warm(self, request: Request, chunks: ChunkCaches) -> None:
        chunks.alone(request.head)
        for d in request.documents:
            chunks.after(request.head, d)


@dataclass
class CacheCraftReuse:
    """Cache-Craft: chunk variants computed in earlier prompts, reused with the recomputation their context impact
    calls for (:mod:`kvsqueeze.reuse.cachecraft`). Its chunk store lives in the process (``Store.local``)."""

    fraction: float = 0.15
    max_deviation: float = 0.5
    name: str = "cachecraft"

    def check(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise KVSqueezeError(f"cachecraft: fraction must be in [0, 1], got {self.fraction}")
        if self.max_deviation < 0:
            raise KVSqueezeError(f"cachecraft: max_deviation must be >= 0, got {self.max_deviation}")

    def variants(self, chunks: ChunkCaches) -> cachecraft.ChunkStore:
        return chunks.store.local.setdefault("cachecraft", cachecraft.ChunkStore())

    def build(self, model, request: Request, chunks: ChunkCaches) -> Reused:
        head = chunks.alone(request.head)
        cache, recomputed = cachecraft.assemble(model, head, list(request.documents), self.variants(chunks),
                                                self.fraction, self.max_deviation)  # fmt: skip
        return Reused(cache, recomputed)

    def warm(self, request: Request, chunks: ChunkCaches) -> None:
        """Chunks not stored yet are computed in another prompt: this request's documents in another order (the
        bench's stand-in for the earlier request a serving system would have kept them from)."""
        chunks.alone(request.head)
        store = self.variants(chunks)
        docs = list(request.documents)
        missing = [i for i, d in enumerate(docs) if cachecraft.chunk_id(d) not in store.variants]
        if not missing:
            return
        order = docs[1:] + docs[:1]
        start = time.perf_counter()
        _, variants = cachecraft.prefill_chunks(chunks.model, request.head, order)
        chunks.encode_seconds += time.perf_counter() - start
        chunks.misses += len(missing)
        for doc, variant in zip(order, variants, strict=True):
            if any(doc is docs[i] for i in missing):
                store.add(cachecraft.chunk_id(doc), variant)


COVERED = 0.95  # the share of a request's document tokens earlier requests must hold for kvshare to reuse them as is


@dataclass
class KVShareReuse:
    """KVShare: the best-aligned earlier request's cache, Dual-Stage High Deviation recomputation at prefill and at
    the first decode step (:mod:`kvsqueeze.reuse.kvshare`). Its index of requests lives in the process
    (``Store.local``); every request it serves is added to it (after its time to first token)."""

    fraction: float = 0.15
    decode_fraction: float = 0.05
    probe: int = 1
    name: str = "kvshare"

    def check(self) -> None:
        for key in ("fraction", "decode_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise KVSqueezeError(f"kvshare: {key} must be in [0, 1], got {getattr(self, key)}")
        if self.probe < 0:
            raise KVSqueezeError(f"kvshare: probe must be a layer index >= 0, got {self.probe}")

    def index(self, chunks: ChunkCaches) -> kvshare.Index:
        """This setting's index (one per spec, so a sweep's kvshare variants never serve each other's outputs)."""
        return chunks.store.local.setdefault(spec_of(self), kvshare.Index())

    def build(self, model, request: Request, chunks: ChunkCaches) -> Reused:
        index = self.index(chunks)
        context = request.context_ids
        cache, positions = kvshare.assemble(model, index, context, self.fraction, self.probe)
        self.reused = torch.ones(context.shape[-1], dtype=torch.bool)
        self.reused[positions] = False
        self.context = context
        start = time.perf_counter()
        index.add(context, truncated(model, cache, context.shape[-1]))  # later requests may reuse this one
        chunks.pause += time.perf_counter() - start
        return Reused(cache, int(positions.numel()))

    def refresh(self, model, cache: CompressedCache, request: Request, token: int) -> torch.Tensor:
        """The decode stage (after the tail is prefilled): returns the logits after ``token``."""
        ids = torch.cat([self.context, request.tail], dim=-1)
        reused = torch.cat([self.reused, torch.zeros(request.tail.shape[-1], dtype=torch.bool)])
        self.refreshed, logits = kvshare.refresh_at_decode(model, cache, ids, token, reused, self.decode_fraction)
        return logits

    def warm(self, request: Request, chunks: ChunkCaches) -> None:
        """Unless earlier requests already hold (almost) every document token, one is made: this request's documents
        in another order (the bench's stand-in for the other tenant's request a serving system would hold) — the
        "chunks in store" condition the other strategies are timed under."""
        index = self.index(chunks)
        _, matched = index.sources(request.context_ids)
        if matched[request.head.shape[-1] :].float().mean() >= COVERED:
            return
        docs = list(request.documents)
        other = torch.cat([request.head, *docs[1:], *docs[:1]], dim=-1)
        cache = CompressedCache(chunks.model, "none")
        start = time.perf_counter()
        cache.prefill(chunks.model, other)
        chunks.encode_seconds += time.perf_counter() - start
        chunks.misses += 1
        index.add(other, cache)


STRATEGIES: dict[str, tuple[type, dict[str, type]]] = {
    "prefix": (PrefixReuse, {}),
    "kvlink": (KVLinkReuse, {"recompute": int}),
    "ape": (APEReuse, {"temperature": float, "scale": float}),
    "cachecraft": (CacheCraftReuse, {"fraction": float, "max_deviation": float}),
    "kvshare": (KVShareReuse, {"fraction": float, "decode_fraction": float, "probe": int}),
}


def parse_reuse(spec: str) -> Strategy:
    """``name[:key=value,…]`` → a strategy (one line naming what is valid otherwise)."""
    name, _, params = spec.strip().partition(":")
    if name not in STRATEGIES:
        raise KVSqueezeError(f"unknown reuse strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    cls, fields = STRATEGIES[name]
    kwargs = {}
    for key, value in split_params(params, spec).items():
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise KVSqueezeError(f"bad parameter {key!r} for reuse strategy {name}; valid parameters: {valid}")
        try:
            kwargs[key] = fields[key](value)
        except ValueError:
            raise KVSqueezeError(f"{name}: {key} must be a {fields[key].__name__}, got {value!r}") from None
        if fields[key] is float and not math.isfinite(kwargs[key]):  # nan passes every < and > check
            raise KVSqueezeError(f"{name}: {key} must be a finite number, got {value!r}")
    strategy = cls(**kwargs)
    check = getattr(strategy, "check", None)
    if check is not None:
        check()
    if getattr(strategy, "recompute", 0) < 0:
        raise KVSqueezeError(f"{name}: recompute must be >= 0 tokens, got {strategy.recompute}")
    for key in ("temperature", "scale"):
        if getattr(strategy, key, 1.0) <= 0:
            raise KVSqueezeError(f"{name}: {key} must be > 0, got {getattr(strategy, key)}")
    return strategy


def spec_of(strategy: Strategy) -> str:
    """The normalized spec of ``strategy`` (parameters that differ from the defaults, sorted)."""
    cls, fields = STRATEGIES[strategy.name]
    default = cls()
    params = [f"{k}={getattr(strategy, k):g}" for k in sorted(fields) if getattr(strategy, k) != getattr(default, k)]
    return strategy.name + (":" + ",".join(params) if params else "")
