"""``CompressedLayer``: the physical storage of one attention layer.

A layer holds

- ``blocks``: immutable runs of kept tokens in the codec's storage, per (row, KV head) — ragged allowed;
- the *tail* ``keys``/``values`` ``[B, H, T, D]``: full-precision tokens. After a dense, uniform compression the
  kept tokens live at the front of the tail (``n_front`` of them, visible to every later query); the rest of the
  tail is tokens appended since the last compression (their mask columns are the last columns of transformers'
  logical mask).

It reports the *logical* length (tokens seen) to transformers, so RoPE positions and masks never shift after
eviction; :meth:`kept_lengths` and the cache's ``nbytes()`` report what is physically held. Every tensor it stores
owns compact storage (:func:`~kvsqueeze.core.storage.owned`): no view of a prefill buffer outlives a compression.

Sliding-window layers (``sliding_window`` set) keep the logical column of every compressed token
(``front_cols``, ``KVBlock.positions``): a query at column ``c`` sees only keys at columns ``> c - window``, tokens
that fall out of the window for good are dropped, and the dense tail is trimmed to the window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin

from kvsqueeze.core.attention_math import fused_partial_attention, merge_partials, partial_attention, sink_partial
from kvsqueeze.core.context import LayerContext
from kvsqueeze.core.masks import causal, visibility
from kvsqueeze.core.storage import DenseBlock, KVBlock, owned, storage_bytes
from kvsqueeze.errors import KVSqueezeError

if TYPE_CHECKING:
    from kvsqueeze.codecs.base import Codec

TRIM_SLACK = 64  # a sliding layer's dense tail is trimmed back to the window once it exceeds it by this many tokens


class CompressedLayer(CacheLayerMixin):
    """Storage of one attention layer (see the module docstring)."""

    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, layer_idx: int, codec: Codec, sliding_window: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.codec = codec
        self.sliding_window = sliding_window
        self.blocks: list[KVBlock] = []
        self.n_front = 0
        self.front_cols: torch.Tensor | None = None  # [B, H, n_front] logical columns (sliding layers only)
        self.front_last = -1  # newest of them
        self.seen = 0
        self.compressions = 0
        self.hold = 0  # newest tail tokens of a multi-token forward, flushed at the next update
        self.kept_run = 0  # newest compressed tokens every row and head kept, stored last: crop may remove them
        self.shift = 0  # positions given up by key re-rotation (seen counts the positions still in use)
        self.state: dict = {}

    @property
    def is_sliding(self) -> bool:
        return self.sliding_window is not None

    # ---- transformers' layer contract --------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])
        self.values = value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.keys.shape[0]:
            raise KVSqueezeError(
                f"the cache holds {self.keys.shape[0]} row(s) but this forward has {key_states.shape[0]}: beam search "
                "or several sequences per prompt over a prefilled cache need one cache per row (or cache.fork() and a "
                "batch of the same size)"
            )
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        new = key_states.shape[-2]
        self.seen += new
        if self.compressed and not self.codec.is_dense:
            self.flush_residual(hold=new if new > 1 else 0)
        elif self.compressed and self.is_sliding:
            self.trim_to_window(new)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.blocks, self.n_front, self.front_cols, self.seen, self.compressions, self.state = [], 0, None, 0, 0, {}
        self.hold = self.shift = 0
        self.is_initialized = False

    # ---- what is held ------------------------------------------------------------------------------------------
    @property
    def compressed(self) -> bool:
        return self.compressions > 0

    @property
    def n_recent(self) -> int:
        return self.keys.shape[-2] - self.n_front

    def kept_lengths(self) -> torch.Tensor:
        """Tokens physically held per (row, KV head): ``[B, H]`` (on the CPU)."""
        if not self.is_initialized:
            return torch.zeros(0, 0, dtype=torch.long)
        B, H, T, _ = self.keys.shape
        lengths = torch.full((B, H), T, dtype=torch.long)
        for block in self.blocks:
            lengths += block.lengths
        return lengths

    def tensors(self) -> list:
        """Everything this layer keeps alive (for byte accounting)."""
        if not self.is_initialized:
            return []
        return [self.keys, self.values, self.front_cols, self.blocks, self.state]

    def nbytes(self) -> int:
        """Bytes of the distinct storages this layer keeps alive."""
        return storage_bytes(*self.tensors())

    def held(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything held, full precision and in chronological order: keys/values ``[B, H, L, D]`` and
        ``valid [B, L]`` (rows left-padded). Heads of a row must hold the same count (decoding schedules)."""
        tail_k, tail_v = self.keys, self.values
        B, H, T, D = tail_k.shape
        if not self.blocks:
            valid = self.state.get("valid")
            if valid is None or valid.shape[-1] != T:
                valid = torch.ones(B, T, dtype=torch.bool, device=tail_k.device)
            return tail_k, tail_v, valid
        counts = torch.stack([block.lengths for block in self.blocks])  # [P, B, H]
        if not bool((counts == counts[..., :1]).all()):
            raise KVSqueezeError("decoding schedules need the same kept count on every head; use the uniform budget")
        per_row = counts[..., 0]  # [P, B]
        totals = per_row.sum(0) + T  # [B]
        L = int(totals.max())
        keys = tail_k.new_zeros(B, H, L, D)
        values = tail_v.new_zeros(B, H, L, tail_v.shape[-1])
        start = L - totals  # [B] first held slot of each row
        for block, n in zip(self.blocks, per_row, strict=True):  # a few blocks, never heads or rows
            k, v = block.materialize(tail_k.dtype)
            slot = start[:, None] + torch.arange(int(n.max()) if n.numel() else 0)[None, :]  # [B, W]
            take = torch.arange(slot.shape[1])[None, :] < n[:, None]
            b_idx, w_idx = take.nonzero(as_tuple=True)
            rows = b_idx[:, None].expand(-1, H).flatten()
            heads = torch.arange(H).repeat(len(b_idx))
            dest = slot[b_idx, w_idx][:, None].expand(-1, H).flatten()
            order = _flat_order(block.lengths, b_idx, w_idx)
            keys[rows, heads, dest] = k[order.to(k.device)]
            values[rows, heads, dest] = v[order.to(v.device)]
            start = start + n
        keys[:, :, L - T :] = tail_k
        values[:, :, L - T :] = tail_v
        valid = torch.arange(L)[None, :] >= (L - totals)[:, None]
        return keys, values, valid.to(tail_k.device)

    # ---- storing a compression ----------------------------------------------------------------------------------
    def store(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, ctx: LayerContext | None) -> None:
        """Replace everything held by the tokens ``keep [B, H, L]`` of ``keys/values [B, H, L, D]`` (what the layer
        held, in order), encoded by the layer's codec; every stored tensor owns compact storage."""
        B, H, L, D = keys.shape
        lengths = keep.sum(-1).cpu()
        cols = self._columns(L, keys.device) if self.is_sliding else None
        codec = self.codec
        self.blocks, self.front_cols = [], None
        run = int(keep.flatten(0, 1).all(0).flip(0).cumprod(0).sum()) if codec.is_dense and L else 0
        if codec.is_dense and bool((lengths == lengths[0, 0]).all()):
            k = int(lengths[0, 0])
            self.keys = keys[keep].view(B, H, k, D)
            self.values = values[keep].view(B, H, k, -1)
            self.n_front = k
            self.kept_run = run
            if cols is not None:
                self.front_cols = cols.expand(B, H, L)[keep].view(B, H, k)
                self.front_last = int(self.front_cols.max()) if k else -1
        else:
            # The last ``residual`` tokens stay in the full-precision tail when every head kept them.
            r = min(codec.residual, L)
            if r and not bool(keep[..., -r:].all()):  # kept by every head, and never padding
                r = 0
            body = keep.clone()
            if r:
                body[..., -r:] = False
            lengths = body.sum(-1).cpu()
            if ctx is not None:
                ctx.stored = body
            if int(lengths.sum()):
                block = codec.encode(keys[body], values[body], lengths, ctx)
                if cols is not None:
                    self._place(block, cols.expand(B, H, L)[body])
                self.blocks = [block]
            self.keys, self.values = owned(keys[..., L - r :, :]), owned(values[..., L - r :, :])
            self.n_front = 0
            self.kept_run = run if isinstance(self.blocks[-1:] and self.blocks[-1], DenseBlock) else 0
        self.compressions += 1
        self.hold = 0

    def store_oldest(self, span: int, keep: torch.Tensor, ctx: LayerContext | None = None) -> None:
        """Replace the oldest ``span`` uncompressed tail tokens (after the dense front) by those ``keep [B, H, span]``
        marks; the newer tail tokens stay as they are (a compression of the part of the sequence that left a recent
        window: Fast KVzip's chunked prefill and decoding). Full-attention layers only. The kept tokens join the
        dense front when every head keeps as many and nothing is in blocks yet; otherwise they are encoded by the
        codec and merged into the last block when the codec can (``Codec.extend``)."""
        if self.is_sliding:
            raise KVSqueezeError("store_oldest compresses full-attention layers only")
        front = self.n_front
        B, H, _, D = self.keys.shape
        keys, values = self.keys[..., front : front + span, :], self.values[..., front : front + span, :]
        rest_k, rest_v = self.keys[..., front + span :, :], self.values[..., front + span :, :]
        lengths = keep.sum(-1).cpu()
        if ctx is not None:
            ctx.stored = keep
        if self.codec.is_dense and not self.blocks and bool((lengths == lengths[0, 0]).all()):
            k = int(lengths[0, 0])
            kept_k, kept_v = keys[keep].view(B, H, k, D), values[keep].view(B, H, k, -1)
            self.keys = torch.cat([self.keys[..., :front, :], kept_k, rest_k], dim=-2)
            self.values = torch.cat([self.values[..., :front, :], kept_v, rest_v], dim=-2)
            self.n_front = front + k
        else:
            blocks = list(self.blocks)
            if front:  # the dense front becomes a block first (every head holds it)
                full = torch.full((B, H), front, dtype=torch.long)
                front_k, front_v = self.keys[..., :front, :], self.values[..., :front, :]
                blocks.append(DenseBlock(front_k.reshape(-1, D), front_v.reshape(-1, front_v.shape[-1]), full))
            if int(lengths.sum()):
                block = self.codec.encode(keys[keep], values[keep], lengths, ctx)
                merged = self.codec.extend(blocks[-1], block) if blocks else None
                if merged is not None:
                    blocks[-1] = merged
                else:
                    blocks.append(block)
            self.blocks = blocks
            self.keys, self.values = owned(rest_k), owned(rest_v)
            self.n_front = 0
        self.kept_run = 0
        self.compressions += 1

    def _columns(self, length: int, device) -> torch.Tensor:
        """Logical columns ``[1, 1, L]`` of the ``L`` tokens held before a compression (the newest is ``seen - 1``)."""
        cols = self.state.get("cols")
        if cols is not None and cols.shape[-1] == length:
            return cols[:, None, :] if cols.dim() == 2 else cols
        return torch.arange(self.seen - length, self.seen, device=device, dtype=torch.int32)[None, None, :]

    @staticmethod
    def _place(block: KVBlock, cols: torch.Tensor) -> None:
        block.positions = owned(cols.to(torch.int32))
        block.first_col = int(cols.min()) if cols.numel() else 0
        block.last_col = int(cols.max()) if cols.numel() else -1

    def flush_residual(self, hold: int = 0) -> None:
        """Encode the oldest tail tokens beyond the codec's full-precision residual, whole groups at a time.

        ``hold``: the newest tokens stay in the tail regardless (the tokens of a multi-token forward, so that they
        attend to each other causally through the tail's mask; they are flushed at the next update)."""
        group = max(self.codec.group, 1)
        n = (self.n_recent - max(self.codec.residual, hold)) // group * group
        if n <= 0 or self.n_front:
            return
        B, H, _, D = self.keys.shape
        lengths = torch.full((B, H), n, dtype=torch.long)
        block = self.codec.encode(self.keys[..., :n, :].reshape(-1, D), self.values[..., :n, :].reshape(-1, D), lengths)
        if self.is_sliding:
            first = self.seen - self.n_recent
            cols = torch.arange(first, first + n, dtype=torch.int32, device=self.keys.device)
            self._place(block, cols.repeat(B * H))
            self.blocks.append(block)  # sliding blocks stay separate: they leave the window one by one
        else:
            merged = self.codec.extend(self.blocks[-1], block) if self.blocks else None
            if merged is not None:
                self.blocks[-1] = merged
            else:
                self.blocks.append(block)
        self.keys, self.values = owned(self.keys[..., n:, :]), owned(self.values[..., n:, :])

    def trim_to_window(self, new: int) -> None:
        """Sliding layers: drop dense tail tokens no future query can see (in steps of ``TRIM_SLACK``)."""
        window = self.sliding_window
        if self.n_recent - new < window + TRIM_SLACK:
            return
        keep_recent = window - 1 + new
        front_k, front_v = self.keys[..., : self.n_front, :], self.values[..., : self.n_front, :]
        self.keys = torch.cat([front_k, self.keys[..., -keep_recent:, :]], dim=-2)
        self.values = torch.cat([front_v, self.values[..., -keep_recent:, :]], dim=-2)

    def expire(self, first_query_col: int) -> None:
        """Sliding layers: drop compressed tokens that no query from ``first_query_col`` on can see."""
        window = self.sliding_window
        self.blocks = [b for b in self.blocks if getattr(b, "last_col", window) > first_query_col - window]
        if self.n_front and self.front_cols is not None and self.front_last <= first_query_col - window:
            front = self.n_front
            self.keys, self.values = owned(self.keys[..., front:, :]), owned(self.values[..., front:, :])
            self.n_front, self.front_cols = 0, None

    # ---- attention over compressed storage ----------------------------------------------------------------------
    def attend(
        self,
        query: torch.Tensor,
        attention_mask,
        scaling: float,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``query [B, Hq, M, D]`` over everything held; returns ``[B, M, Hq, D]`` (transformers' layout).

        Dense uniform storage with nothing special is one SDPA call; otherwise partials over each block, the tail and
        the attention sinks are merged by log-sum-exp."""
        B, Hq, M, D = query.shape
        H = self.keys.shape[1]
        G = Hq // H
        device = query.device
        first_col = self.seen - M
        if self.is_sliding:
            self.expire(first_col)
        n_front, n_recent = self.n_front, self.n_recent
        recent = visibility(attention_mask, B, M, n_recent, device)
        if recent is None and M > 1:
            recent = causal(M, n_recent, device)[None, None]
        front = None  # visibility of the front tokens [B, H, M, n_front]; None = all visible
        if self.is_sliding and n_front and self.front_cols is not None:
            q_cols = torch.arange(first_col, self.seen, device=device)
            front = self.front_cols[:, :, None, :] > (q_cols - self.sliding_window)[None, None, :, None]
        if not self.blocks and sinks is None and softcap is None:
            mask = self._tail_mask(recent, front, M, n_front, n_recent, device)
            if mask is not None and mask.shape[1] == H and G > 1:
                mask = mask.repeat_interleave(G, dim=1)
            out = F.scaled_dot_product_attention(
                query, self.keys, self.values, attn_mask=mask, scale=scaling, enable_gqa=G > 1
            )
            return out.transpose(1, 2)
        grouped = query.reshape(B, H, G * M, D)
        parts = [self._block_partial(block, grouped, scaling, softcap, first_col, M) for block in self.blocks]
        if self.keys.shape[-2]:
            mask = self._tail_mask(recent, front, M, n_front, n_recent, device)
            if mask is None and softcap is None:
                parts.append(fused_partial_attention(grouped, self.keys, self.values, scaling))
            else:
                if mask is not None:
                    mask = mask.unsqueeze(2).expand(-1, -1, G, -1, -1).reshape(mask.shape[0], mask.shape[1], G * M, -1)
                parts.append(partial_attention(grouped, self.keys, self.values, scaling, mask, softcap))
        if sinks is not None:
            parts.append(sink_partial(sinks, grouped, G, M))
        return merge_partials(parts).view(B, Hq, M, -1).transpose(1, 2)

    @staticmethod
    def _tail_mask(recent, front, M: int, n_front: int, n_recent: int, device) -> torch.Tensor | None:
        """Boolean mask of the queries over the tail ``[B|1, H|1, M, T]`` (None = every tail token visible)."""
        if recent is None and front is None:
            return None
        if recent is None:
            recent = torch.ones(1, 1, M, n_recent, dtype=torch.bool, device=device)
        if front is None:
            front = torch.ones(*recent.shape[:-1], n_front, dtype=torch.bool, device=device)
        else:
            recent = recent.expand(front.shape[0], front.shape[1], -1, -1)
        return torch.cat([front.expand(*recent.shape[:-1], -1), recent], dim=-1)

    def _block_partial(self, block: KVBlock, grouped, scaling: float, softcap, first_col: int, M: int):
        key_mask = None
        if self.is_sliding and block.positions is not None and block.first_col <= self.seen - 1 - self.sliding_window:
            q_cols = torch.arange(first_col, self.seen, device=grouped.device)
            key_mask = block.positions[None, :] > (q_cols - self.sliding_window)[:, None]  # [M, N]
        if softcap is None and key_mask is None:
            stateful = getattr(block, "attend_with_state", None)  # blocks whose steps depend on earlier steps
            if stateful is not None:  # (LouisKV's retrieved set): per-stream state, in this layer's (forked) state
                return stateful(grouped, scaling, self.state)
            attend_at = getattr(block, "attend_at", None)  # blocks that score with the queries' RoPE positions
            return block.attend(grouped, scaling) if attend_at is None else attend_at(grouped, scaling, first_col, M)
        return block.attend_masked(grouped, scaling, softcap=softcap, key_mask=key_mask)

    # ---- generate features --------------------------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest tokens (transformers' convention: a negative count): the uncompressed tail, and the newest
        compressed tokens too when every row and head kept them in full precision (assisted generation's first
        forward holds the prompt and the draft tokens together; rejected drafts are cropped after compression)."""
        if tokens_to_remove > 0:
            raise KVSqueezeError("crop takes a negative count of tokens to remove (transformers' convention)")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        croppable = self.n_recent + (0 if self.is_sliding else self.kept_run)
        if n > croppable or (self.compressed and self.state.get("aligned")):
            raise KVSqueezeError(
                f"cannot crop {n} tokens from layer {self.layer_idx}: only the {croppable} newest can be removed "
                "(rolled-back tokens must not be compressed or evicted yet; decoding schedules cannot roll back)"
            )
        from_compressed = max(n - self.n_recent, 0)
        if from_compressed and self.n_front:  # every recent token goes, then the newest of the dense front
            self.n_front -= from_compressed
            front = self.n_front
            self.keys, self.values = owned(self.keys[..., :front, :]), owned(self.values[..., :front, :])
        else:
            if from_compressed:  # the newest tokens of every segment of the last (dense) block
                self.blocks[-1] = self.blocks[-1].drop_newest(from_compressed)
            keep = self.keys.shape[-2] - (n - from_compressed)
            self.keys, self.values = owned(self.keys[..., :keep, :]), owned(self.values[..., :keep, :])
        self.kept_run -= from_compressed
        self.seen -= n
        self.hold = max(self.hold - (n - from_compressed), 0)
        if not self.compressed and "valid" in self.state:
            self.state["valid"] = owned(self.state["valid"][:, :-n])

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep batch ``rows`` (in that order): beam search's reorder and batch selection."""
        if not self.is_initialized:
            return
        if any(k in self.state for k in self.state.get("aligned", ())):
            raise KVSqueezeError("beam search is not supported with a decoding schedule; use greedy or sampling")
        try:
            self.blocks = [block.select_rows(rows) for block in self.blocks]
        except NotImplementedError:
            names = {type(b).__name__ for b in self.blocks}
            raise KVSqueezeError(
                f"beam search over {', '.join(sorted(names))} storage is not supported; use a dense codec, or greedy "
                "decoding or sampling"
            ) from None
        idx = rows.to(self.keys.device)
        self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)
        if self.front_cols is not None:
            self.front_cols = self.front_cols.index_select(0, idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            B = self.keys.shape[0]
            self.select_rows(torch.arange(B).repeat_interleave(repeats))


def _flat_order(lengths: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Flat index (row, head, token order) of token ``slots[i]`` of row ``rows[i]`` for every head: ``[len * H]``."""
    B, H = lengths.shape
    flat = lengths.flatten()
    starts = (torch.cumsum(flat, 0) - flat).view(B, H)
    return (starts[rows] + slots[:, None]).flatten()
