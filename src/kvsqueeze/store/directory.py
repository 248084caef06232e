"""The directory store: one ``<key>.kvs`` file per cache under ``root/<first two characters>/``.

Writes go to a temporary file and are renamed into place (readers see a whole blob or none; two processes writing
the same key leave one of the two whole blobs). Reading a cache touches its file, so its modification time is its
last use; with ``max_bytes`` the store deletes the least recently used files until it fits again, under a file lock
so that concurrent writers do not evict twice. The prefix-length index of each namespace is a small text file of
lengths, appended under the same lock.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from filelock import FileLock

from kvsqueeze.core.persist import write_atomically
from kvsqueeze.errors import KVSqueezeError, os_reason

SUFFIX = ".kvs"


class DirectoryBackend:
    def __init__(self, root: Path, max_bytes: int | None = None):
        self.root, self.max_bytes = Path(root).expanduser(), max_bytes
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise KVSqueezeError(
                f"cannot use {self.root} as a cache store ({os_reason(exc, self.root)}); give a writable directory"
            ) from None
        self.lock = FileLock(str(self.root / ".lock"))

    def path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise KVSqueezeError(f"bad store key {key!r}")
        return self.root / key[:2] / f"{key}{SUFFIX}"

    def put(self, key: str, blob: bytes) -> None:
        if self.max_bytes is not None and len(blob) > self.max_bytes:
            raise KVSqueezeError(f"a {len(blob)}-byte cache does not fit a store of max_bytes={self.max_bytes}")
        try:
            write_atomically(self.path(key), blob)
        except OSError as exc:
            raise KVSqueezeError(f"cannot write to the cache store {self.root}: {os_reason(exc, self.root)}") from None
        if self.max_bytes is not None:
            self.evict(keep=key)

    def get(self, key: str) -> bytes | None:
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # its last use, for least-recently-used eviction
        return data

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def files(self) -> list[Path]:
        return [p for p in self.root.glob(f"*/*{SUFFIX}") if not p.name.startswith(".")]

    def entries(self) -> list[str]:
        return [p.name.removesuffix(SUFFIX) for p in self.files()]

    def nbytes(self) -> int:
        total = 0
        for p in self.files():
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_size
        return total

    def evict(self, keep: str | None = None) -> None:
        """Delete the least recently used caches until the store holds at most ``max_bytes`` (never ``keep``)."""
        with self.lock:
            entries = []
            for p in self.files():
                with contextlib.suppress(FileNotFoundError):
                    st = p.stat()
                    entries.append((st.st_mtime_ns, st.st_size, p))
            total = sum(size for _, size, _ in entries)
            for _, size, p in sorted(entries, key=lambda e: e[0]):
                if total <= self.max_bytes:
                    break
                if p.name == f"{keep}{SUFFIX}":
                    continue
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    total -= size

    def index(self, space: str) -> Path:
        return self.root / "index" / f"{space}.lengths"

    def add_length(self, space: str, length: int) -> None:
        path = self.index(space)
        with self.lock:
            if length in self.lengths(space):
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(f"{length}\n")

    def lengths(self, space: str) -> list[int]:
        try:
            text = self.index(space).read_text()
        except FileNotFoundError:
            return []
        return [int(line) for line in text.split() if line.isdigit()]
