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
from collections.abc import Iterable, Iterator

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


class KVBlock:
    """Kept tokens of one layer in some storage format; subclasses define ``materialize`` (and may override
    ``attend`` with a faster path that reads their own format).

    ``positions``: optional flat ``[N]`` int32 logical position of every token (set by the cache on sliding-window
    layers, whose queries only see tokens within the window).
    """

    lengths: torch.Tensor  # [B, H] long, on CPU
    positions: torch.Tensor | None = None

    @property
    def uniform(self) -> bool:
        return bool((self.lengths == self.lengths.flatten()[0]).all())

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

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
        if self.uniform:
            L = int(self.lengths[0, 0])
            return fused_partial_attention(q, keys.view(B, H, L, -1), values.view(B, H, L, -1), scaling)
        return ragged_attention(q, keys, values, self.lengths, scaling)

    def attend_masked(
        self, q: torch.Tensor, scaling: float, softcap: float | None = None, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`attend` with logit soft-capping and/or a flat ``[N]`` key mask (False = invisible): the generic
        path through :meth:`materialize`, correct for every block type."""
        keys, values = self.materialize(q.dtype)
        return ragged_attention(q, keys, values, self.lengths, scaling, softcap=softcap, key_mask=key_mask)

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
