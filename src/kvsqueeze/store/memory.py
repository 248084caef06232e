"""The in-process store (``open("memory://")``): blobs in a dict of this process, least recently used first out
under ``max_bytes``. What a sweep uses when no ``--store`` is given: caches live as long as the store object."""

from __future__ import annotations

from collections import OrderedDict

from kvsqueeze.errors import KVSqueezeError


class MemoryBackend:
    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self.blobs: OrderedDict[str, bytes] = OrderedDict()  # least recently used first
        self.index: dict[str, set[int]] = {}

    def put(self, key: str, blob: bytes) -> None:
        if self.max_bytes is not None and len(blob) > self.max_bytes:
            raise KVSqueezeError(f"a {len(blob)}-byte cache does not fit a store of max_bytes={self.max_bytes}")
        self.blobs[key] = blob
        self.blobs.move_to_end(key)
        while self.max_bytes is not None and self.nbytes() > self.max_bytes:
            self.blobs.popitem(last=False)

    def get(self, key: str) -> bytes | None:
        blob = self.blobs.get(key)
        if blob is not None:
            self.blobs.move_to_end(key)
        return blob

    def delete(self, key: str) -> None:
        self.blobs.pop(key, None)

    def entries(self) -> list[str]:
        return list(self.blobs)

    def nbytes(self) -> int:
        return sum(len(b) for b in self.blobs.values())

    def add_length(self, space: str, length: int) -> None:
        self.index.setdefault(space, set()).add(length)

    def lengths(self, space: str) -> list[int]:
        return sorted(self.index.get(space, ()))
