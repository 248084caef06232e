"""The Redis store (``redis://host:port/db``): caches shared by processes and machines.

Layout under a prefix (default ``kvs``):

- ``{prefix}:meta:{key}`` — a hash: ``version`` (a random id per write), ``size``, ``chunks``, ``sha256``;
- ``{prefix}:chunk:{key}:{version}:{i}`` — the blob in chunks of ``chunk`` bytes (4 MiB: Redis values stay small);
- ``{prefix}:lru`` — a sorted set of keys by last use; ``{prefix}:sizes`` — a hash of their sizes (kept without TTL,
  so an expired entry is still subtracted from the total); ``{prefix}:bytes`` — the total size held;
- ``{prefix}:lengths:{namespace}`` — a set: the prefix lengths stored in a namespace.

A write stores its chunks under a new version first, then swaps the metadata in one transaction (``WATCH`` on the
metadata: a concurrent writer makes it retry) and deletes the previous version's chunks, so a reader sees a
complete blob of one version: it reads the metadata, then that version's chunks, and checks the SHA-256 (a
chunk deleted under it by a newer write means the read is retried with the new metadata). With ``ttl`` every key
of an entry expires; with ``max_bytes`` the least recently used entries are deleted after a write.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.extras import require

CHUNK = 4 << 20


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***`` (messages name the store without leaking the password)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:  # a malformed netloc (a bad port): keep the scheme and path only
        parts = urlsplit(url)
        return urlunsplit((parts.scheme, "***", parts.path, parts.query, parts.fragment))
    return urlunsplit((parts.scheme, f"{user}:***@{host}{port}", parts.path, parts.query, parts.fragment))


class RedisBackend:
    def __init__(self, url: str, max_bytes: int | None = None, ttl: int | None = None, prefix: str = "kvs",
                 chunk: int = CHUNK):  # fmt: skip
        require("a Redis cache store", "redis")
        import redis

        if ttl is not None and ttl < 1:
            raise KVSqueezeError(f"ttl must be >= 1 second, got {ttl}")
        self.errors = (redis.RedisError, OSError)
        self.watch_error = redis.WatchError
        self.url, self.max_bytes, self.ttl, self.prefix, self.chunk = url, max_bytes, ttl, prefix, chunk
        self.shown = redacted(url)  # what messages print
        try:
            self.redis = redis.Redis.from_url(url)
            self.redis.ping()
        except ValueError as exc:  # a port that is not a number or out of range (checked on connecting), a bad db
            raise KVSqueezeError(f"bad Redis store URL {self.shown!r} ({exc}); write redis://host:port/db") from None
        except self.errors as exc:
            first = (str(exc).splitlines() or [""])[0]
            raise KVSqueezeError(
                f"cannot reach the Redis store at {self.shown} ({first}); start redis-server there or fix the URL"
            ) from None

    # ---- keys ------------------------------------------------------------------------------------------------
    def meta_key(self, key: str) -> str:
        return f"{self.prefix}:meta:{key}"

    def chunk_key(self, key: str, version: str, i: int) -> str:
        return f"{self.prefix}:chunk:{key}:{version}:{i}"

    # ---- blobs -----------------------------------------------------------------------------------------------
    def put(self, key: str, blob: bytes) -> None:
        if self.max_bytes is not None and len(blob) > self.max_bytes:
            raise KVSqueezeError(f"a {len(blob)}-byte cache does not fit a store of max_bytes={self.max_bytes}")
        version = uuid.uuid4().hex
        n = max(1, -(-len(blob) // self.chunk))
        try:
            pipe = self.redis.pipeline(transaction=False)
            for i in range(n):
                pipe.set(self.chunk_key(key, version, i), blob[i * self.chunk : (i + 1) * self.chunk], ex=self.ttl)
            pipe.execute()
            old = self._swap(key, version, n, blob)
            if old is not None:
                self.redis.delete(*(self.chunk_key(key, old[0], i) for i in range(old[1])))
            if self.max_bytes is not None:
                self.evict(keep=key)
        except self.errors as exc:
            raise KVSqueezeError(f"the Redis store at {self.shown} failed a write: {exc}") from None

    def _swap(self, key: str, version: str, n: int, blob: bytes) -> tuple[str, int] | None:
        """Point the metadata at the new version in one transaction; returns the replaced ``(version, chunks)``."""
        meta = self.meta_key(key)
        digest = hashlib.sha256(blob).hexdigest()
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(meta, f"{self.prefix}:sizes")
                    old = pipe.hgetall(meta)
                    old_size = int(pipe.hget(f"{self.prefix}:sizes", key) or 0)
                    pipe.multi()
                    pipe.hset(meta, mapping={"version": version, "size": len(blob), "chunks": n, "sha256": digest})
                    if self.ttl is not None:
                        pipe.expire(meta, self.ttl)
                    pipe.zadd(f"{self.prefix}:lru", {key: time.time()})
                    pipe.hset(f"{self.prefix}:sizes", key, len(blob))
                    pipe.incrby(f"{self.prefix}:bytes", len(blob) - old_size)
                    pipe.execute()
                except self.watch_error:
                    continue
            if not old:
                return None
            return old[b"version"].decode(), int(old[b"chunks"])

    def get(self, key: str) -> bytes | None:
        try:
            for _ in range(5):  # a newer write may delete the chunks under a reader: read its version instead
                meta = self.redis.hgetall(self.meta_key(key))
                if not meta:
                    self.forget(key)  # expired (or never stored)
                    return None
                version, n = meta[b"version"].decode(), int(meta[b"chunks"])
                parts = self.redis.mget([self.chunk_key(key, version, i) for i in range(n)])
                if any(p is None for p in parts):
                    continue
                blob = b"".join(parts)
                if hashlib.sha256(blob).hexdigest() != meta[b"sha256"].decode():
                    continue
                self.redis.zadd(f"{self.prefix}:lru", {key: time.time()})
                return blob
        except self.errors as exc:
            raise KVSqueezeError(f"the Redis store at {self.shown} failed a read: {exc}") from None
        raise KVSqueezeError(f"stored {key} kept changing or is corrupt in the Redis store at {self.shown}")

    def delete(self, key: str) -> None:
        meta = self.redis.hgetall(self.meta_key(key))
        self.redis.delete(self.meta_key(key))
        if meta:
            self.redis.delete(*(self.chunk_key(key, meta[b"version"].decode(), i) for i in range(int(meta[b"chunks"]))))
        self.forget(key)

    def forget(self, key: str) -> None:
        """Drop ``key`` from the recency set and the size total (once, also when two processes race)."""
        size = self.redis.hget(f"{self.prefix}:sizes", key)
        if size is not None and self.redis.hdel(f"{self.prefix}:sizes", key):
            self.redis.incrby(f"{self.prefix}:bytes", -int(size))
        self.redis.zrem(f"{self.prefix}:lru", key)

    def entries(self) -> list[str]:
        start = len(f"{self.prefix}:meta:")
        return [k.decode()[start:] for k in self.redis.scan_iter(f"{self.prefix}:meta:*")]

    def nbytes(self) -> int:
        return int(self.redis.get(f"{self.prefix}:bytes") or 0)

    def evict(self, keep: str | None = None) -> None:
        """Delete the least recently used entries while the store holds more than ``max_bytes``."""
        while self.nbytes() > self.max_bytes:
            oldest = [k.decode() for k in self.redis.zrange(f"{self.prefix}:lru", 0, 1)]
            victims = [k for k in oldest if k != keep]
            if not victims:
                return
            self.delete(victims[0])

    # ---- the prefix index --------------------------------------------------------------------------------------
    def add_length(self, space: str, length: int) -> None:
        self.redis.sadd(f"{self.prefix}:lengths:{space}", length)

    def lengths(self, space: str) -> list[int]:
        return [int(x) for x in self.redis.smembers(f"{self.prefix}:lengths:{space}")]
