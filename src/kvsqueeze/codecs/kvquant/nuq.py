"""KVQuant's non-uniform datatype (nuqX) with per-vector dense-and-sparse outliers and Q-Norm."""

from __future__ import annotations

import torch

from kvsqueeze.codecs.packing import unpack
from kvsqueeze.core.rope import tensor_key


# ---- the non-uniform datatype with dense-and-sparse outliers -------------------------------------------------
def outlier_mask(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """``x [V, n]`` (one vector per row): True at the ``round(fraction·n)`` elements farthest from the row mean."""
    k = min(round(fraction * x.shape[1]), x.shape[1] - 1) if x.shape[1] else 0
    mask = torch.zeros_like(x, dtype=torch.bool)
    if k > 0:
        dev = (x.float() - x.float().mean(1, keepdim=True)).abs()
        mask.scatter_(1, dev.topk(k, dim=1).indices, True)
    return mask


def dense_range(x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mid, half-range) ``[V]`` of each row's dense (non-outlier) elements; half-range > 0."""
    xf = x.float()
    lo = torch.where(out, torch.full_like(xf, float("inf")), xf).amin(1)
    hi = torch.where(out, torch.full_like(xf, -float("inf")), xf).amax(1)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    return mid, torch.where(half > 0, half, torch.ones_like(half))


_LUTS: dict[tuple, torch.Tensor] = {}
_KEYS: dict[int, tuple] = {}  # centroid tensor → its bytes (read once)


def centroid_lut(centroids: torch.Tensor, bits: int, dtype, device) -> torch.Tensor:
    """Centroid values of every packed byte (2/4 bits: ``[256, 8 // bits]``) or, for 3 bits, of every (2-bit-plane
    byte, 1-bit-plane nibble) pair: ``[4096, 4]`` — four codes per lookup."""
    raw = tensor_key(centroids, _KEYS)
    key = (raw, bits, dtype, str(device))
    if key not in _LUTS:
        c = centroids.to(dtype)
        if bits == 3:
            a = torch.arange(4096) % 256
            nib = torch.arange(4096) // 256
            k = torch.arange(4)
            codes = ((a[:, None] >> (2 * k)) & 3) | (((nib[:, None] >> k) & 1) << 2)
        else:
            per = 8 // bits
            codes = (torch.arange(256)[:, None] >> (torch.arange(per) * bits)) & ((1 << bits) - 1)
        _LUTS[key] = c[codes].to(device).contiguous()
    return _LUTS[key]


def centroid_values(packed: torch.Tensor, bits: int, n: int, centroids: torch.Tensor, dtype) -> torch.Tensor:
    """Centroid values ``[rows, n]`` of packed codes by table lookup (see :func:`kvsqueeze.codecs.packing.pack`:
    a byte holds whole 2/4-bit codes; 3-bit codes are a 2-bit plane then a 1-bit plane, four codes = one byte of
    the first and one nibble of the second)."""
    rows = packed.shape[0]
    if bits in (2, 4):
        vals = centroid_lut(centroids, bits, dtype, packed.device).index_select(0, packed.reshape(-1).to(torch.int32))
        vals = vals.view(rows, -1)
    elif bits == 3:
        n8 = packed.shape[1] // 3 * 8
        plane2, plane1 = packed[:, : n8 // 4], packed[:, n8 // 4 :]
        nib = torch.stack([plane1 & 15, plane1 >> 4], dim=-1).view(rows, n8 // 4)
        idx = plane2.to(torch.int32) + nib.to(torch.int32) * 256
        vals = centroid_lut(centroids, 3, dtype, packed.device).index_select(0, idx.view(-1)).view(rows, n8)
    else:
        return centroids.to(dtype).to(packed.device)[unpack(packed, bits, n).long()]
    return vals if vals.shape[1] == n else vals[:, :n]


def nearest(norm: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (``centroids`` sorted ascending) of every element: uint8."""
    c = centroids.float().to(norm.device)
    bounds = (c[1:] + c[:-1]) / 2
    return torch.bucketize(norm.float().contiguous(), bounds).to(torch.uint8)


def qnorm_params(x, out, codes, centroids, mid, half, enabled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, offset) ``[V]`` with x̂ = centroid·scale + offset; Q-Norm matches each row's dense mean/std."""
    if not enabled:
        return half.half(), mid.half()
    dense = (~out).float()
    n = dense.sum(1).clamp(min=1)
    q = centroids.float().to(x.device)[codes.long()]
    xf = x.float()
    mu, mu_q = (xf * dense).sum(1) / n, (q * dense).sum(1) / n
    sd = (((xf - mu[:, None]) ** 2 * dense).sum(1) / n).sqrt()
    sd_q = (((q - mu_q[:, None]) ** 2 * dense).sum(1) / n).sqrt()
    scale = torch.where(sd_q > 1e-12, sd / sd_q.clamp(min=1e-12), half)
    return scale.half(), (mu - scale * mu_q).half()


def nuq_encode(x: torch.Tensor, centroids: torch.Tensor, fraction: float, qnorm: bool):
    """Quantize rows ``x [V, n]``: codes ``[V, n]``, outlier mask, (mid, half) and fp16 (scale, offset) ``[V]``."""
    out = outlier_mask(x, fraction)
    mid, half = dense_range(x, out)
    codes = nearest((x.float() - mid[:, None]) / half[:, None], centroids)
    scale, offset = qnorm_params(x, out, codes, centroids, mid, half, qnorm)
    return codes, out, mid, half, scale, offset


# ---- the block ---------------------------------------------------------------------------------------------
