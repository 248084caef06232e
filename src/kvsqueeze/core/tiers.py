"""Storage tiers: *hot* memory, where attention runs (GPU memory on a GPU, RAM on a CPU), and a *cold* store where a
retrieval method keeps the full keys/values it brings back a few pages at a time.

- :class:`ColdStore` holds named arrays of shape ``[B, H, P, page, D]`` (pages of one (row, KV head) each) and
  gathers pages by index (:meth:`ColdStore.take`). Two backends: ``ram`` (CPU tensors, pinned when the hot device
  is CUDA) and ``disk`` (a file per array in a temporary directory or one the user names, read through a read-only
  ``numpy.memmap``; the file is written with ordinary writes, never through the mapping, and the mapped pages are
  dropped from the process (``madvise(MADV_DONTNEED)``) after every read, so the cold bytes leave the process'
  resident memory).
- Byte accounting stays storage-based: a RAM store's tensors are storages the cache keeps alive (``nbytes()``
  counts them) and :func:`cold_keys` names them so ``nbytes(tier="hot")`` leaves them out; a disk store holds no
  tensor, so its bytes appear only in ``nbytes(tier="cold")`` (:func:`disk_bytes`).
- :class:`FetchMeter`: bytes brought from cold to hot. A block's ``attend`` calls :func:`record_fetch`; the cache
  meters each compressed attention call (:func:`metered`) and reports bytes fetched per decoded token.
"""

from __future__ import annotations

import contextlib
import contextvars
import mmap
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from kvsqueeze.core.storage import NOT_STORAGE
from kvsqueeze.errors import KVSqueezeError

BACKENDS = ("ram", "disk")
_INT_VIEW = {2: (torch.int16, np.int16), 4: (torch.int32, np.int32), 1: (torch.uint8, np.uint8)}


class FetchMeter:
    """Bytes fetched from cold storage and query tokens attended over compressed storage (layer 0 counts them)."""

    def __init__(self):
        self.fetched_bytes = 0
        self.tokens = 0
        self.steps = 0  # forward passes attended over compressed storage (a multi-token forward is one)

    def per_token(self) -> float:
        return self.fetched_bytes / self.tokens if self.tokens else 0.0

    def per_step(self) -> float:
        """Bytes fetched per forward pass: what one step brings into hot memory (the working set beside the hot
        summaries), where per token divides a multi-token forward's one fetch by its tokens."""
        return self.fetched_bytes / self.steps if self.steps else 0.0


_METER: contextvars.ContextVar[FetchMeter | None] = contextvars.ContextVar("kvsqueeze_fetch_meter", default=None)


@contextlib.contextmanager
def metered(meter: FetchMeter):
    """Fetches recorded inside the block go to ``meter``."""
    token = _METER.set(meter)
    try:
        yield meter
    finally:
        _METER.reset(token)


def record_fetch(nbytes: int) -> None:
    """Called by a block when it brings ``nbytes`` from its cold store to hot memory."""
    meter = _METER.get()
    if meter is not None:
        meter.fetched_bytes += int(nbytes)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


class ColdStore:
    """Named page arrays ``[B, H, P, page, D]`` kept out of hot memory (see the module docstring).

    Arrays are written once (:meth:`put`) and never modified, so forks of a cache share the store."""

    def __init__(self, backend: str = "ram", directory: str | None = None, hot_device: torch.device | None = None):
        if backend not in BACKENDS:
            raise KVSqueezeError(f"unknown cold tier {backend!r}; use tier=ram or tier=disk")
        self.backend = backend
        self.hot_device = torch.device("cpu") if hot_device is None else torch.device(hot_device)
        self.arrays: dict[str, torch.Tensor] = {}  # ram backend
        self.maps: dict[str, tuple[np.memmap, torch.dtype, tuple]] = {}  # disk backend
        self.directory = None
        if backend == "disk":
            self.directory = check_directory(directory)

    # ---- writing ----------------------------------------------------------------------------------------------
    def put(self, name: str, array: torch.Tensor) -> None:
        """Store ``array`` (moved out of hot memory); the caller drops its own reference."""
        if self.backend == "ram":
            cold = array.detach().to("cpu", copy=array.device.type != "cpu").contiguous()
            if self.hot_device.type == "cuda" and torch.cuda.is_available():
                cold = cold.pin_memory()
            self.arrays[name] = cold
            return
        host = array.detach().cpu().contiguous()
        int_t, np_t = _INT_VIEW[host.element_size()]
        data = host.view(int_t).numpy()
        fd, path = tempfile.mkstemp(prefix=f"kvsqueeze-{name}-", suffix=".bin", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data.tobytes() if data.size else b"")
            shape = tuple(host.shape)
            mapped = np.memmap(path, dtype=np_t, mode="r", shape=shape) if data.size else np.zeros(shape, np_t)
        except OSError as exc:
            _remove(path)
            raise KVSqueezeError(f"cannot write the cold tier to {self.directory}: {exc.strerror or exc}") from None
        weakref.finalize(self, _remove, path)
        self.maps[name] = (mapped, host.dtype, shape)

    # ---- reading ----------------------------------------------------------------------------------------------
    def take(self, name: str, pages: torch.Tensor) -> torch.Tensor:
        """Pages ``pages [B, H, k]`` of array ``name``: ``[B, H, k, page, D]`` on the hot device (recorded as fetched).

        On a CUDA hot device the page indices are brought to the host (one synchronisation per call)."""
        B, H, _ = pages.shape
        index = pages.to("cpu", torch.long)
        rows = torch.arange(B)[:, None, None]
        heads = torch.arange(H)[None, :, None]
        if self.backend == "ram":
            out = self.arrays[name][rows, heads, index]
        else:
            mapped, dtype, _ = self.maps[name]
            got = mapped[rows.numpy(), heads.numpy(), index.numpy()]
            self._drop(mapped)
            out = torch.from_numpy(np.ascontiguousarray(got)).view(dtype)
        record_fetch(out.numel() * out.element_size())
        return out.to(pages.device, non_blocking=True)

    def take_points(self, name: str, rows: np.ndarray, heads: np.ndarray, pages: np.ndarray) -> torch.Tensor:
        """Pages at arbitrary (row, head, page) points (host integer arrays of one length ``n``): ``[n, page, D]`` on
        the CPU (recorded as fetched); for a caller that splits its reads between tiers on the host."""
        if self.backend == "ram":
            out = self.arrays[name][torch.from_numpy(rows), torch.from_numpy(heads), torch.from_numpy(pages)]
        else:
            mapped, dtype, _ = self.maps[name]
            got = mapped[rows, heads, pages]
            self._drop(mapped)
            out = torch.from_numpy(np.ascontiguousarray(got)).view(dtype)
        record_fetch(out.numel() * out.element_size())
        return out

    def full(self, name: str) -> torch.Tensor:
        """The whole array on the hot device (recorded as fetched)."""
        if self.backend == "ram":
            out = self.arrays[name]
        else:
            mapped, dtype, _ = self.maps[name]
            out = torch.from_numpy(np.array(mapped)).view(dtype)
            self._drop(mapped)
        record_fetch(out.numel() * out.element_size())
        return out.to(self.hot_device)

    @staticmethod
    def _drop(mapped) -> None:
        """Drop the mapped pages from this process (they stay in the file and the page cache)."""
        handle = getattr(mapped, "_mmap", None)
        if handle is not None and hasattr(handle, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            handle.madvise(mmap.MADV_DONTNEED)

    def nbytes(self) -> int:
        ram = sum(t.untyped_storage().nbytes() for t in self.arrays.values())
        return ram + sum(m.nbytes for m, _, _ in self.maps.values())


def check_directory(directory: str | None) -> str | None:
    """A writable directory for the disk tier (None: the system's temporary directory), refused in one line."""
    if directory is None or directory == "":
        return None
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise KVSqueezeError(f"cold directory {directory!r} is not a directory; create it or name another (dir=PATH)")
    if not os.access(path, os.W_OK | os.X_OK):
        raise KVSqueezeError(f"cold directory {directory!r} is not writable; name a writable one (dir=PATH)")
    return str(path)


def cold_stores(*objs) -> list[ColdStore]:
    """Every distinct :class:`ColdStore` reachable from ``objs`` (through containers and kvsqueeze objects)."""
    found: dict[int, ColdStore] = {}
    seen: set[int] = set()
    stack = list(objs)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, torch.Tensor):
            continue
        seen.add(id(obj))
        if isinstance(obj, ColdStore):
            found[id(obj)] = obj
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, NOT_STORAGE):
            stack.extend(vars(obj).values())
    return list(found.values())


def cold_keys(*objs) -> dict[tuple, int]:
    """Storage keys (as :func:`kvsqueeze.core.storage.storage_keys`) of the RAM cold stores reachable from ``objs``."""
    from kvsqueeze.core.storage import storage_keys

    return storage_keys(t for store in cold_stores(*objs) for t in store.arrays.values())


def disk_bytes(*objs) -> int:
    """Bytes held in disk-backed cold stores reachable from ``objs`` (files, not process memory)."""
    return sum(m.nbytes for store in cold_stores(*objs) for m, _, _ in store.maps.values())


# ---- pages ----------------------------------------------------------------------------------------------------
def paginate(flat: torch.Tensor, lengths: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat ragged ``[N, D]`` tokens ((row, head, token) order, ``lengths [B, H]`` on the CPU) as zero-padded pages
    ``[B, H, P, page, D]`` and the count of real tokens in every page ``[B, H, P]`` (on ``flat``'s device)."""
    B, H = lengths.shape
    flat_len = lengths.flatten()
    P = max(int((flat_len.max() + page - 1) // page) if flat_len.numel() else 0, 1)
    width = P * page
    device = flat.device
    starts = (torch.cumsum(flat_len, 0) - flat_len).to(device)
    slot = torch.arange(width, device=device)
    present = slot[None, :] < flat_len.to(device)[:, None]  # [BH, W]
    index = (starts[:, None] + slot[None, :]).clamp(max=max(flat.shape[0] - 1, 0))
    if flat.shape[0]:
        padded = flat[index] * present[..., None].to(flat.dtype)
    else:
        padded = flat.new_zeros(B * H, width, flat.shape[-1])
    counts = (flat_len.to(device)[:, None] - torch.arange(P, device=device)[None, :] * page).clamp(0, page)
    return padded.view(B, H, P, page, -1), counts.view(B, H, P)


def unpaginate(pages: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`paginate`: the real tokens of ``pages [B, H, P, page, D]``, flat ``[N, D]``."""
    page = pages.shape[3]
    present = torch.arange(page, device=pages.device)[None, None, None, :] < counts[..., None]
    return pages[present]
