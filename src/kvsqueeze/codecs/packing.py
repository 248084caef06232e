"""Bit packing of small integer codes into ``uint8`` storage.

Codes of ``bits`` bits (1–8) along the last dimension are packed densely: ``n`` codes take exactly
``n * bits / 8`` bytes (the last dimension is zero-padded to a multiple of eight codes). Widths that divide a
byte pack directly (2-bit: four per byte; 1-bit signs: eight per byte). Other widths are split into bit
planes of 4/2/1 bits stored one after the other (3-bit = a 2-bit plane + a 1-bit plane: eight codes in three
bytes), so that every plane decodes with one table lookup per byte. ``unpack(pack(c, b), b, n) == c``.
"""

from __future__ import annotations

import torch

from kvsqueeze.errors import KVSqueezeError

_PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}
_CACHE: dict[tuple, torch.Tensor] = {}


def _planes(bits: int) -> list[tuple[int, int]]:
    """(width, shift) of each bit plane, lowest bits first."""
    if int(bits) not in _PLANES:
        raise KVSqueezeError(f"bit width must be between 1 and 8, got {bits}")
    out, shift = [], 0
    for w in _PLANES[int(bits)]:
        out.append((w, shift))
        shift += w
    return out


def packed_width(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take (``n`` padded to a multiple of eight codes)."""
    return (n + 7) // 8 * bits


def _shifts(width: int, device: torch.device) -> torch.Tensor:
    key = ("shift", width, str(device))
    if key not in _CACHE:
        _CACHE[key] = (torch.arange(8 // width, device=device) * width).to(torch.uint8)
    return _CACHE[key]


def _table(width: int, shift: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[256, 8 // width]``: the codes (times ``2**shift``) that one packed byte holds."""
    key = ("lut", width, shift, dtype, str(device))
    if key not in _CACHE:
        byte = torch.arange(256, device=device)[:, None]
        codes = (byte >> (torch.arange(8 // width, device=device) * width)) & ((1 << width) - 1)
        _CACHE[key] = (codes << shift).to(dtype)
    return _CACHE[key]


def _pack_plane(codes: torch.Tensor, width: int) -> torch.Tensor:
    if width == 8:
        return codes
    per = 8 // width
    shifted = codes.reshape(*codes.shape[:-1], -1, per) << _shifts(width, codes.device)
    out = shifted[..., 0]
    for i in range(1, per):
        out = out | shifted[..., i]
    return out


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dimension into ``uint8``."""
    planes = _planes(bits)
    pad = (-codes.shape[-1]) % 8
    codes = codes.to(torch.uint8)
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    parts = [_pack_plane((codes >> shift) & ((1 << w) - 1), w) for w, shift in planes]
    return torch.cat(parts, dim=-1).contiguous() if len(parts) > 1 else parts[0].contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes of each packed row, as ``uint8`` (bit-exact)."""
    planes = _planes(bits)
    n8 = packed.shape[-1] // bits * 8
    out = torch.zeros(*packed.shape[:-1], n8, dtype=torch.uint8, device=packed.device)
    start = 0
    for w, shift in planes:
        part = packed[..., start : start + n8 * w // 8]
        start += n8 * w // 8
        if w < 8:
            part = (part.unsqueeze(-1) >> _shifts(w, packed.device)) & ((1 << w) - 1)
        out |= part.reshape(out.shape) << shift
    return out[..., :n]


_WIDE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _byte_table(width: int, shift: int, device: torch.device) -> torch.Tensor:
    """``[256]``: the ``8 // width`` codes (times ``2**shift``) of every packed byte as bytes of one wide integer, so
    that one element gather unpacks a whole byte (re-viewed as ``uint8``, the codes in order)."""
    key = ("bytes", width, shift, str(device))
    if key not in _CACHE:
        codes = _table(width, shift, torch.uint8, device).contiguous()
        _CACHE[key] = codes.view(_WIDE[codes.shape[1]]).view(256)
    return _CACHE[key]


def unpack_float(packed: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The codes of :func:`unpack` directly as floating point, by one table lookup per packed byte (fast path:
    the codes of a byte are gathered as one wide integer, planes joined as bytes, then one conversion)."""
    planes = _planes(bits)
    lead = packed.shape[:-1]
    n8 = packed.shape[-1] // bits * 8
    out = None
    start = 0
    for w, shift in planes:
        part = packed[..., start : start + n8 * w // 8]
        start += n8 * w // 8
        if w == 8:
            codes = part.reshape(*lead, n8)
        else:
            idx = part.reshape(-1).to(torch.int32)
            codes = _byte_table(w, shift, packed.device).index_select(0, idx).view(torch.uint8).view(*lead, n8)
        out = codes if out is None else out | codes
    out = out.to(dtype)
    return out if n == n8 else out[..., :n]
