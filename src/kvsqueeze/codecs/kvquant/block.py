"""The KVQuant block: packed nuq codes of pre-RoPE keys and of values, outliers, positions."""

from __future__ import annotations

import torch

from kvsqueeze.codecs.kvquant.nuq import centroid_values
from kvsqueeze.core.rope import cos_sin_table, rerope, rotate_half_pairs
from kvsqueeze.core.storage import KVBlock, interleave_segments


class KVQuantBlock(KVBlock):
    """Packed nuq codes of pre-RoPE keys (per channel) and values (per token), outliers, positions.

    Keys: ``kcodes [N, ⌈D/8⌉·bits]``, per (row, head) segment and channel ``kmid/khalf`` (normalization) and
    ``kscale/koff`` (dequantization), fp16 ``[BH, D]``. Values: ``vcodes``, ``vscale/voff [N]`` fp16. Outliers:
    ``k_idx/v_idx`` int32 flat positions in ``[N·D]``, ``k_val/v_val`` fp16. Positions: ``pos_start [BH]`` int32
    (consecutive per head) or ``pos [N]`` int32. ``next_pos [B]``: position of the next token to be appended.
    Host copies (Python ints, set when the block is built so that reading and appending never read a device
    tensor): ``host_starts`` (the per-head starts, or None), ``host_next`` (``next_pos``), ``host_span`` (smallest and
    largest position).
    """

    def __init__(self, **parts):
        self.__dict__.update(parts)
        self.lengths = self.lengths.cpu()

    def __getattr__(self, name: str):
        """Host copies missing from a block saved before they existed: read once from the device tensors."""
        if name not in ("host_starts", "host_next", "host_span") or "lengths" not in self.__dict__:
            raise AttributeError(name)
        pos = self.positions()
        self.__dict__["host_starts"] = tuple(self.pos_start.tolist()) if self.pos is None else None
        self.__dict__["host_next"] = tuple(self.next_pos.tolist())
        self.__dict__["host_span"] = (int(pos.min()), int(pos.max())) if pos.numel() else (0, -1)
        return self.__dict__[name]

    def positions(self) -> torch.Tensor:
        if self.pos is not None:
            return self.pos.long()
        counts = self.lengths.flatten().to(self.pos_start.device, non_blocking=True)
        n = self.host.total
        starts = torch.repeat_interleave(self.pos_start.long(), counts, output_size=n)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts, output_size=n)
        return starts + torch.arange(n, device=counts.device) - first

    def _shared_run(self) -> tuple[int, int] | None:
        """(start, length) when every head holds the same consecutive positions (no eviction): broadcastable."""
        if self.pos is not None or not self.uniform or len(set(self.host_starts)) != 1:
            return None
        return self.host_starts[0], self.host.width

    def dequant_pre(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE keys and values ``[N, D]`` (outliers restored)."""
        D = self.dim
        counts = self.lengths.flatten().to(self.kcodes.device, non_blocking=True)
        n = self.host.total
        kc = centroid_values(self.kcodes, self.bits, D, self.kcent, dtype)
        if self.uniform and n:
            BH = counts.numel()
            keys = torch.addcmul(self.koff.to(dtype)[:, None], kc.view(BH, -1, D), self.kscale.to(dtype)[:, None]).view(
                n, D
            )
        else:
            ks = torch.repeat_interleave(self.kscale.to(dtype), counts, dim=0, output_size=n)
            ko = torch.repeat_interleave(self.koff.to(dtype), counts, dim=0, output_size=n)
            keys = torch.addcmul(ko, kc, ks)
        vc = centroid_values(self.vcodes, self.bits, D, self.vcent, dtype)
        values = torch.addcmul(self.voff.to(dtype)[:, None], vc, self.vscale.to(dtype)[:, None])
        keys.view(-1).index_copy_(0, self.k_idx.long(), self.k_val.to(dtype))
        values.view(-1).index_copy_(0, self.v_idx.long(), self.v_val.to(dtype))
        return keys, values

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.dequant_pre(torch.float32)
        run = self._shared_run()
        if self.inv_freq is not None and run is not None and keys.numel():
            start, L = run
            cos_t, sin_t = cos_sin_table(self.inv_freq, start + L, keys.device)
            cos, sin = cos_t[start : start + L], sin_t[start : start + L]
            if self.rope_scaling != 1.0:
                cos, sin = cos * self.rope_scaling, sin * self.rope_scaling
            keys = rotate_half_pairs(keys.view(-1, L, self.dim), cos, sin).view(-1, self.dim)
        elif self.inv_freq is not None:
            keys = rerope(keys, self.positions(), self.inv_freq, self.rope_scaling, span=self.host_span)
        return keys.to(dtype), values.to(dtype)

    @property
    def dim(self) -> int:
        return self.kmid.shape[-1]


def remap_outliers(idx: torch.Tensor, dim: int, counts: list[int], shift: list[int]) -> torch.Tensor:
    """Flat positions of a block's elements after segment ``i`` moves by ``shift[i]`` tokens."""
    if not idx.numel():
        return idx
    ends = torch.tensor(counts).cumsum(0).to(idx.device, non_blocking=True)
    seg = torch.bucketize(idx.long() // dim, ends, right=True)
    return (idx.long() + torch.tensor(shift).to(idx.device, non_blocking=True)[seg] * dim).to(torch.int32)


def interleave_rows(a: torch.Tensor, a_counts: list[int], b: torch.Tensor, b_counts: list[int]) -> torch.Tensor:
    return interleave_segments(a, a_counts, b, b_counts)
