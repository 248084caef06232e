"""Physical storage: blocks of kept tokens, and the bytes a cache really keeps alive.

A :class:`KVBlock` is an immutable run of kept tokens of one layer, per (row, KV head): ``lengths [B, H]`` (on the
CPU, so shapes never need a device synchronisation) may differ between heads (ragged storage), and the tokens are
flat ``[N, D]`` in (row, head, token) order. Attention reads a block through :meth:`KVBlock.attend`, which returns a
partial result (output and log-sum-exp) so blocks of different codecs and the full-precision tail combine exactly.

Bytes are storage: :func:`storage_bytes` adds up ``untyped_storage().nbytes()`` of the *distinct* storages reachable
from an object, so a view of a larger buffer counts the whole buffer and a storage shared by two tensors counts once.
Everything a cache stores goes through :func:`owned` first, so no view of a larger buffer survives a compression.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import torch
from transformers import PretrainedConfig

from kvsqueeze.core.attention_math import fused_partial_attention, ragged_attention

# what a cache may reference but does not hold: the model's modules and config, classes, functions, modules
NOT_STORAGE = (torch.nn.Module, PretrainedConfig, type, types.ModuleType, types.FunctionType, types.MethodType)


def owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it is contiguous and owns exactly its storage, else a compact contiguous copy."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    return (t.device.type, t.device.index, storage.data_ptr(), storage.nbytes())


def walk_tensors(obj, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``obj`` through containers and objects (blocks and codec state of any package; not
    modules, configs, classes or functions)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if type(obj) is not torch.Tensor and flatten is not None:  # a wrapper subclass (e.g. optimum-quanto's)
            for name in flatten()[0]:
                yield from walk_tensors(getattr(obj, name), seen)
        else:
            yield obj
    elif isinstance(obj, dict):
        for value in list(obj.values()):
            yield from walk_tensors(value, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in list(obj):
            yield from walk_tensors(value, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, NOT_STORAGE):  # blocks, codec state (yours too)
        for value in list(vars(obj).values()):
            yield from walk_tensors(value, seen)


def storage_keys(tensors: Iterable[torch.Tensor]) -> dict[tuple, int]:
    """Distinct storages of ``tensors``: key → bytes."""
    return {_storage_key(t): t.untyped_storage().nbytes() for t in tensors}


def storage_bytes(*objs, exclude: set[tuple] | frozenset = frozenset()) -> int:
    """Bytes of the distinct storages reachable from ``objs`` (views count their whole buffer, shared ones once)."""
    seen: set[int] = set()
    keys = storage_keys(t for obj in objs for t in walk_tensors(obj, seen))
    return sum(n for key, n in keys.items() if key not in exclude)


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """``numel × element_size`` of tensors (what a compact copy of them would take)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class HostShape(NamedTuple):
    """What a block's ``lengths`` say, as Python ints (computed once per block: no tensor read per decode step)."""

    counts: tuple[int, ...]  # tokens per (row, head), flat
    width: int  # the longest segment
    total: int
    uniform: bool


def host_shape(lengths: torch.Tensor) -> HostShape:
    counts = tuple(lengths.flatten().tolist())
    return HostShape(counts, max(counts, default=0), sum(counts), len(set(counts)) <= 1)


def interleave_index(a_counts: Sequence[int], b_counts: Sequence[int]) -> torch.Tensor:
    """Index into ``cat([a, b])`` that puts ``a``'s segment i then ``b``'s segment i, for every i (host, int64)."""
    a = torch.tensor(a_counts, dtype=torch.long)
    b = torch.tensor(b_counts, dtype=torch.long)
    n_a = int(a.sum())
    sizes = torch.stack([a, b], 1).flatten()  # segments in output order
    starts = torch.stack([torch.cumsum(a, 0) - a, n_a + torch.cumsum(b, 0) - b], 1).flatten()
    offsets = torch.repeat_interleave(starts - (torch.cumsum(sizes, 0) - sizes), sizes)
    return torch.arange(int(sizes.sum())) + offsets


def interleave_segments(a: torch.Tensor, a_counts: Sequence[int], b: torch.Tensor, b_counts: Sequence[int]):
    """``a``'s segment i then ``b``'s segment i, for every i, in one gather (no loop over segments)."""
    index = interleave_index(a_counts, b_counts).to(a.device, non_blocking=True)
    return torch.cat([a, b]).index_select(0, index)


class KVBlock:
    """Kept tokens of one layer in some storage format; subclasses define ``materialize`` (and may override
    ``attend`` with a faster path that reads their own format).

    ``positions``: optional flat ``[N]`` int32 logical position of every token (set by the cache on sliding-window
    layers, whose queries only see tokens within the window).
    """

    lengths: torch.Tensor  # [B, H] long, on CPU
    positions: torch.Tensor | None = None

    @property
    def host(self) -> HostShape:
        """``lengths`` as Python ints, computed once per block (cached next to the tensor it describes)."""
        cached = self.__dict__.get("host_of")
        if cached is None or cached[0] is not self.lengths:
            cached = (self.lengths, tuple(host_shape(self.lengths)))
            self.__dict__["host_of"] = cached
        return HostShape(*cached[1])

    @property
    def uniform(self) -> bool:
        return self.host.uniform

    @property
    def tokens(self) -> int:
        return self.host.total

    def nbytes(self) -> int:
        """Bytes of the distinct storages this block holds."""
        return storage_bytes(self)

    def bits_per_element(self) -> float:
        """Bytes held × 8 per stored key/value element (needs ``self.dim``, the head dim)."""
        return 8.0 * self.nbytes() / (2 * max(self.tokens, 1) * self.dim)

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision keys/values, flat ``[N, D]`` in (row, head, token) order: a transient copy."""
        raise NotImplementedError

    def attend(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial attention of grouped queries ``q [B, H, M, D]`` (M = groups × query tokens): ``(out, lse)``."""
        keys, values = self.materialize(q.dtype)
        B, H = self.lengths.shape
        host = self.host
        if host.uniform:
            L = host.width
            return fused_partial_attention(q, keys.view(B, H, L, -1), values.view(B, H, L, -1), scaling)
        return ragged_attention(q, keys, values, self.lengths, scaling, width=host.width)

    def attend_masked(
        self, q: torch.Tensor, scaling: float, softcap: float | None = None, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`attend` with logit soft-capping and/or a flat ``[N]`` key mask (False = invisible): the generic
        path through :meth:`materialize`, correct for every block type."""
        keys, values = self.materialize(q.dtype)
        return ragged_attention(
            q, keys, values, self.lengths, scaling, softcap=softcap, key_mask=key_mask, width=self.host.width
        )

    def select_rows(self, rows: torch.Tensor) -> KVBlock:
        """The block restricted to batch ``rows`` (beam search); blocks whose codec has no row layout refuse."""
        raise NotImplementedError


def segment_index(lengths: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token indices of the (row, head) segments of batch ``rows`` (in that order), and their lengths."""
    H = lengths.shape[1]
    flat = lengths.flatten()
    starts = torch.cumsum(flat, 0) - flat
    rows = rows.to(torch.long).cpu()
    picked = (rows[:, None] * H + torch.arange(H)[None, :]).flatten()
    counts = flat[picked]
    offsets = torch.repeat_interleave(starts[picked] - (torch.cumsum(counts, 0) - counts), counts)
    index = torch.arange(int(counts.sum())) + offsets
    return index, counts.view(len(rows), H)


class PairBlock(KVBlock):
    """Keys and values as two encoded tensors, each with ``nbytes()`` and ``dequant(dtype)`` (flat ``[N, D]``)."""

    def __init__(self, keys, values, lengths: torch.Tensor, dim: int):
        self.keys, self.values, self.lengths, self.dim = keys, values, lengths.cpu(), dim

    def materialize(self, dtype):
        return self.keys.dequant(dtype), self.values.dequant(dtype)


class DenseBlock(KVBlock):
    """Kept tokens at the model's dtype, flat ``[N, D]`` with per-head lengths (ragged-capable)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor):
        self.keys, self.values, self.lengths = owned(keys), owned(values), lengths.cpu()
        self.dim = keys.shape[-1]

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys.to(dtype), self.values.to(dtype)

    def drop_newest(self, count: int) -> DenseBlock:
        """The block without the newest ``count`` tokens of every (row, head) segment."""
        flat = self.lengths.flatten()
        starts = torch.cumsum(flat, 0) - flat
        kept = flat - count
        index = torch.repeat_interleave(starts, kept) + (
            torch.arange(int(kept.sum())) - torch.repeat_interleave(torch.cumsum(kept, 0) - kept, kept)
        )
        index = index.to(self.keys.device)
        block = DenseBlock(self.keys[index], self.values[index], kept.view_as(self.lengths))
        if self.positions is not None:
            block.positions = owned(self.positions[index])
        return block

    def select_rows(self, rows: torch.Tensor) -> DenseBlock:
        index, lengths = segment_index(self.lengths, rows)
        index = index.to(self.keys.device)
        block = DenseBlock(self.keys[index], self.values[index], lengths)
        if self.positions is not None:
            block.positions = owned(self.positions[index])
        return block
