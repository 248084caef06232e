"""A store of caches that outlive a request: ``kvsqueeze.store.open(url)``.

- a directory (the default; ``open("path/to/dir")`` or ``open("file:///path")``): one file per cache, written
  atomically, safe for concurrent processes, an optional size limit with least-recently-used eviction
  (:mod:`kvsqueeze.store.directory`);
- memory (``open("memory://")``): this process only, least recently used out under ``max_bytes``
  (:mod:`kvsqueeze.store.memory`; the bench's default chunk store);
- Redis (``open("redis://host:port/db")``) for several processes and machines: blobs in chunks, metadata in a hash,
  optional TTL and size limit (:mod:`kvsqueeze.store.redis_backend`; extra ``kvsqueeze[redis]``).

Caches are keyed by (model, method, token ids): :func:`cache_key`. :meth:`Store.save` / :meth:`Store.load` move
whole caches (the blobs of :mod:`kvsqueeze.core.persist`); :meth:`Store.longest_prefix` finds the longest stored
prefix of a prompt — the prefix-reuse baseline (:func:`kvsqueeze.store.prefix.generate_with_prefix`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import torch

from kvsqueeze.core.architectures import check_model
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.persist import config_hash, load_bytes, to_bytes
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.validation import parse_method_arg


def namespace(model, method) -> str:
    """Caches of one model under one method share a namespace (a hash of both)."""
    check_model(model)
    spec = parse_method_arg(method).spec()
    return hashlib.sha256(f"{config_hash(model.config)}|{spec}".encode()).hexdigest()[:24]


def cache_key(model, method, token_ids: torch.Tensor) -> str:
    """The key of the cache of ``token_ids [1, L]`` under ``method`` for ``model``."""
    if token_ids.dim() != 2 or token_ids.shape[0] != 1:
        raise KVSqueezeError("a stored cache holds one sequence: give token ids of shape [1, L]")
    digest = hashlib.sha256(token_ids.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()
    return f"{namespace(model, method)}-{token_ids.shape[-1]}-{digest[:32]}"


class Backend(Protocol):
    """Where blobs live: the two methods a backend implements (plus a prefix-length index per namespace)."""

    def put(self, key: str, blob: bytes) -> None: ...

    def get(self, key: str) -> bytes | None: ...

    def delete(self, key: str) -> None: ...

    def entries(self) -> list[str]: ...

    def nbytes(self) -> int: ...

    def add_length(self, space: str, length: int) -> None: ...

    def lengths(self, space: str) -> list[int]: ...


class Store:
    """Caches keyed by (model, method, token ids) over a :class:`Backend`."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.local: dict = {}  # in-process state of reuse methods that manage chunk stores of their own (Cache-Craft)

    def save(self, cache: CompressedCache, model, token_ids: torch.Tensor | None = None) -> str:
        """Store ``cache`` (its recorded token ids, or ``token_ids``) and return its key."""
        ids = cache.tokens if token_ids is None else token_ids
        if ids is None:
            raise KVSqueezeError(
                "the cache does not know its tokens: pass token_ids=, or prefill it with cache.prefill"
            )
        if ids.shape[-1] != cache.get_seq_length():
            raise KVSqueezeError(f"{ids.shape[-1]} token ids for a cache holding {cache.get_seq_length()} positions")
        key = cache_key(model, cache.method, ids)
        self.backend.put(key, to_bytes(cache))
        self.backend.add_length(namespace(model, cache.method), int(ids.shape[-1]))
        return key

    def load(self, key: str, model, tokenizer=None) -> CompressedCache | None:
        """The cache stored under ``key`` for ``model``, or None when there is none (evicted, expired, never
        stored); a blob that is there but corrupt is a one-line error."""
        blob = self.backend.get(key)
        return None if blob is None else load_bytes(CompressedCache, blob, model, tokenizer, where=f"stored {key}")

    def longest_prefix(self, model, method, token_ids: torch.Tensor, tokenizer=None):
        """``(cache, length)`` of the longest stored prefix of ``token_ids [1, L]`` (shorter than the whole), or
        ``(None, 0)``."""
        space = namespace(model, method)
        for length in sorted(set(self.backend.lengths(space)), reverse=True):
            if length >= token_ids.shape[-1]:
                continue
            cache = self.load(cache_key(model, method, token_ids[:, :length]), model, tokenizer)
            if cache is not None:
                return cache, length
        return None, 0

    def nbytes(self) -> int:
        return self.backend.nbytes()

    def __len__(self) -> int:
        return len(self.backend.entries())


def open(url: str | Path, *, max_bytes: int | None = None, ttl: int | None = None) -> Store:
    """A store at ``url``: a directory path (or ``file://``), ``memory://`` or ``redis://host:port[/db]``.
    ``max_bytes`` bounds what it holds (least recently used caches go first); ``ttl`` (seconds, Redis) expires
    entries."""
    text = str(url)
    if max_bytes is not None and max_bytes < 1:
        raise KVSqueezeError(f"max_bytes must be >= 1, got {max_bytes}")
    if text.startswith(("redis://", "rediss://", "unix://")):
        from kvsqueeze.store.redis_backend import RedisBackend

        return Store(RedisBackend(text, max_bytes=max_bytes, ttl=ttl))
    if text == "memory://":
        from kvsqueeze.store.memory import MemoryBackend

        if ttl is not None:
            raise KVSqueezeError("ttl is a Redis store option; a memory store evicts by size (max_bytes)")
        return Store(MemoryBackend(max_bytes=max_bytes))
    if "://" in text and not text.startswith("file://"):
        raise KVSqueezeError(
            f"unknown store URL {text!r}: give a directory, file:///path, memory:// or redis://host:port"
        )
    if ttl is not None:
        raise KVSqueezeError("ttl is a Redis store option; a directory store evicts by size (max_bytes)")
    from kvsqueeze.store.directory import DirectoryBackend

    return Store(DirectoryBackend(Path(text.removeprefix("file://")), max_bytes=max_bytes))
