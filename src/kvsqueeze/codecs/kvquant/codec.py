"""``kvquant``: pre-RoPE per-channel keys, per-token values, a sensitivity-weighted non-uniform datatype,
per-vector dense-and-sparse outliers and Q-Norm.

Paper: "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache Quantization", Hooper et al.,
arXiv 2401.18079.

- Pre-RoPE keys: the cached (post-RoPE) keys are rotated back exactly with their known positions, quantized
  per channel, and the rotation is re-applied after dequantization when the block is read (the query cannot be
  rotated once instead: the rotation depends on each key's position). Positions are stored (int32; one start
  per head when a head's positions are consecutive, as without eviction).
- Values: per token. (Reading a block gathers cos/sin from one float32 table per RoPE, shared by all layers and grown
  by doubling, as transformers' rotary embedding used to keep; it is model state, not part of a cache's bytes.)
- nuqX: ``2**bits`` centroids per layer (one datatype for keys, one for values) in the normalized range
  ``[-1, 1]``, fitted offline by k-means weighted with the diagonal Fisher information approximated by squared
  gradients of the language-model loss with respect to the keys/values on calibration text
  (:func:`calibrate_kvquant`, CLI ``kvsqueeze calibrate kvquant --out F.json``; cached per model). Elements are
  rounded to the nearest centroid; codes are bit-packed.
- Per-vector dense-and-sparse: in every vector (a key channel over a head's tokens; a value token) the
  ``outliers`` fraction of elements farthest from the vector's mean is stored exactly as fp16 values with int32
  positions (counted in the bytes); the rest is normalized to ``[-1, 1]`` with the vector's own range.
- Q-Norm: per vector, the dequantized dense elements are shifted and scaled so that their mean and standard
  deviation equal those of the originals (folded into the stored fp16 scale and offset: no extra bytes).
- Decoding: each new token's key is quantized with its head's per-channel normalization (the paper's fixed
  per-channel key thresholds: elements outside the range become outliers); its value per token, as the paper does
  online. So that a decode step never reads a data-dependent count back from the device, every new key token keeps
  a fixed ``max(1, round(outliers × D))`` exact elements, its largest in normalized magnitude (in-range ones stored
  exactly cost bytes, not accuracy; further out-of-range elements of that token are clamped to the datatype).
  ``residual=0, group=1`` (the paper keeps no full-precision window).

Deviations: the per-channel key ranges and outlier thresholds are taken from the context being compressed (the
paper calibrates them offline); the calibration text is the offline essays (``n_tokens`` tokens), not Wikitext-2;
the k-means objective weights each normalized element by its Fisher weight times the vector's squared half-range
(the paper's objective ``Σ F (A − Q(A))²`` in activation units); with short vectors the outlier count is
``round(outliers × length)`` (1 per value token at head dim 64 and 1%); no attention-sink token kept in fp16
(a later addition of the paper); no custom kernels — a block is dequantized (transiently) when read. With eviction
and ``residual > 0``, the position of the first token left in the tail is inferred from the stored mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field, field_validator

from kvsqueeze.calibration.store import read_file
from kvsqueeze.codecs.base import Codec
from kvsqueeze.codecs.kvquant.block import KVQuantBlock, interleave_rows, remap_outliers
from kvsqueeze.codecs.kvquant.nuq import centroid_lut, nearest, nuq_encode
from kvsqueeze.codecs.packing import pack
from kvsqueeze.core.rope import cos_sin_table, unrope
from kvsqueeze.core.storage import DenseBlock, KVBlock, host_shape
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import register

CALIBRATED_BITS = (2, 3, 4)


def load_config(path: str) -> dict:
    """A calibration file: ``{"rope": (inv_freq tensor, scaling), "layers": {layer: {bits: (keys, values)}}}``."""
    if not Path(path).expanduser().is_file():
        raise KVSqueezeError(f"kvquant config {path!r} not found; run `kvsqueeze calibrate kvquant --out {path}`")
    return read_file(path, parse_config)


def parse_config(file: Path) -> dict:
    path = str(file)
    try:
        data = json.loads(file.read_text())
        rope = (torch.tensor(data["rope"]["inv_freq"], dtype=torch.float64), float(data["rope"]["scaling"]))
        layers = {
            int(k): {int(b): (torch.tensor(c["keys"]), torch.tensor(c["values"])) for b, c in v.items()}
            for k, v in data["layers"].items()
        }
    except (ValueError, KeyError, TypeError):
        raise KVSqueezeError(f"{path} is not a kvquant configuration; rerun `kvsqueeze calibrate kvquant`") from None
    return {"rope": rope, "layers": layers}


# ---- the codec ----------------------------------------------------------------------------------------------
@register
class KVQuantCodec(Codec):
    name = "kvquant"
    family = "quantization"
    paper = "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache Quantization"
    arxiv = "2401.18079"

    bits: int = 3
    config: str = ""
    outliers: float = Field(0.01, ge=0.0, lt=0.5)
    qnorm: bool = True
    prerope: bool = True
    residual: int = 0
    group: int = 1

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value not in CALIBRATED_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, CALIBRATED_BITS))}, got {value}")
        return value

    def _datatype(self, layer_idx: int):
        if not self.config:
            raise KVSqueezeError("kvquant needs a calibration: kvquant:config=F.json (kvsqueeze calibrate kvquant)")
        cfg = load_config(self.config)
        if layer_idx not in cfg["layers"]:
            raise KVSqueezeError(f"{self.config} has no datatype for layer {layer_idx}; calibrate for this model")
        kc, vc = cfg["layers"][layer_idx][self.bits]
        inv, scaling = cfg["rope"]
        return kc.half(), vc.half(), (inv if self.prerope else None), scaling

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        if ctx is None:  # decode-time flush: quantized by extend() with the head's per-channel normalization
            return DenseBlock(keys, values, lengths)
        kcent, vcent, inv_freq, scaling = self._datatype(ctx.layer_idx)
        B, H = lengths.shape
        L = ctx.length
        dev = keys.device
        pos_all = ctx.positions if ctx.positions is not None else torch.arange(L, device=dev)[None].expand(B, L)
        stored = ctx.stored if ctx.stored is not None else torch.ones(B, H, L, dtype=torch.bool, device=dev)
        pos = pos_all[:, None, :].expand(B, H, L)[stored]
        r = min(self.residual, L)
        in_tail = r > 0 and not bool(stored[..., L - r :].any())
        next_pos = pos_all[:, L - r] if in_tail else pos_all[:, -1] + 1
        return self._build(keys, values, lengths, pos, next_pos, kcent, vcent, inv_freq, scaling)

    def _build(self, keys, values, lengths, pos, next_pos, kcent, vcent, inv_freq, scaling) -> KVQuantBlock:
        counts = lengths.flatten().tolist()
        D = keys.shape[-1]
        pre = unrope(keys.float(), pos, inv_freq, scaling) if inv_freq is not None else keys.float()
        kcodes, kmids, khalfs, kscales, koffs, kidx, kval = [], [], [], [], [], [], []
        start = 0
        for seg in pre.split(counts):
            n = seg.shape[0]
            if n == 0:
                for lst in (kmids, khalfs, kscales, koffs):
                    lst.append(torch.zeros(D, device=keys.device, dtype=torch.float16))
                continue
            codes, out, mid, half, scale, off = nuq_encode(seg.T, kcent, self.outliers, self.qnorm)
            kcodes.append(codes.T)
            kmids.append(mid.half())
            khalfs.append(half.half())
            kscales.append(scale)
            koffs.append(off)
            t, c = out.T.nonzero(as_tuple=True)
            kidx.append(((start + t) * D + c).to(torch.int32))
            kval.append(seg[t, c].half())
            start += n
        vcodes, vout, _, _, vscale, voff = nuq_encode(values.float(), vcent, self.outliers, self.qnorm)
        vt, vch = vout.nonzero(as_tuple=True)
        contiguous = all(bool((s[1:] - s[:-1] == 1).all()) for s in pos.split(counts) if s.numel() > 1)
        starts = torch.stack([s[0] if s.numel() else s.new_zeros(()) for s in pos.split(counts)])
        empty_i, empty_h = torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.float16)
        span = (int(pos.min()), int(pos.max())) if pos.numel() else (0, -1)  # host copies: read once, at prefill
        if inv_freq is not None:
            cos_sin_table(inv_freq, span[1] + 1, keys.device)  # the RoPE table exists before the first decode step
        for cent in (kcent, vcent):  # so do the centroid tables a read uses
            centroid_lut(cent, self.bits, torch.float32, keys.device)
        return KVQuantBlock(
            lengths=lengths, bits=self.bits, inv_freq=inv_freq, rope_scaling=scaling,
            kcodes=pack(torch.cat(kcodes) if kcodes else torch.zeros(0, D, dtype=torch.uint8), self.bits),
            kmid=torch.stack(kmids), khalf=torch.stack(khalfs), kscale=torch.stack(kscales), koff=torch.stack(koffs),
            k_idx=torch.cat(kidx) if kidx else empty_i, k_val=torch.cat(kval) if kval else empty_h,
            vcodes=pack(vcodes, self.bits), vscale=vscale, voff=voff,
            v_idx=(vt * D + vch).to(torch.int32), v_val=values[vt, vch].half(),
            pos_start=starts.to(torch.int32) if contiguous else None,
            pos=None if contiguous else pos.to(torch.int32),
            next_pos=next_pos.to(torch.int32), kcent=kcent, vcent=vcent,
            host_starts=tuple(starts.tolist()) if contiguous else None, host_next=tuple(next_pos.tolist()),
            host_span=span,
        )  # fmt: skip

    def extend(self, block, newer):
        if isinstance(block, KVQuantBlock) and isinstance(newer, DenseBlock):
            return self.append(block, newer.keys, newer.values, newer.lengths)
        return None

    def append(self, block: KVQuantBlock, keys, values, lengths) -> KVQuantBlock:
        """Quantize newly decoded tokens (flat ``[N, D]``, ``lengths [B, H]``) into ``block``: positions, segment
        layout and outlier counts are known on the host, so nothing is read back from the device."""
        B, H = lengths.shape
        D = block.dim
        new_counts, old_counts = list(host_shape(lengths).counts), list(block.host.counts)
        dev = keys.device
        N = sum(new_counts)
        rows = torch.arange(B).repeat_interleave(H)
        seg_first = torch.tensor(block.host_next, dtype=torch.long)[rows]  # [B·H] position of each head's first token
        counts_t = torch.tensor(new_counts, dtype=torch.long)
        offsets = torch.arange(N) - torch.repeat_interleave(torch.cumsum(counts_t, 0) - counts_t, counts_t)
        pos_host = torch.repeat_interleave(seg_first, counts_t) + offsets
        pos = pos_host.to(dev, non_blocking=True)
        rep = counts_t.to(dev, non_blocking=True)
        pre = unrope(keys.float(), pos, block.inv_freq, block.rope_scaling) if block.inv_freq is not None else keys
        mid = torch.repeat_interleave(block.kmid.float(), rep, dim=0, output_size=N)
        half = torch.repeat_interleave(block.khalf.float(), rep, dim=0, output_size=N)
        norm = (pre.float() - mid) / half
        kcodes = nearest(norm, block.kcent)
        # beyond the head's per-channel thresholds: stored exactly, a fixed number per token (the largest |norm|)
        nk_t, nk_c = top_elements(norm.abs(), max(1, round(self.outliers * D)))
        vcodes, vout, _, _, vscale, voff = nuq_encode(values.float(), block.vcent, self.outliers, self.qnorm)
        nv_t, nv_c = row_outliers(vout, min(round(self.outliers * D), D - 1))
        old_shift = [sum(new_counts[:i]) for i in range(len(old_counts))]
        new_shift = [sum(old_counts[: i + 1]) for i in range(len(new_counts))]
        new_kidx = remap_outliers((nk_t * D + nk_c).to(torch.int32), D, new_counts, new_shift)
        new_vidx = remap_outliers((nv_t * D + nv_c).to(torch.int32), D, new_counts, new_shift)
        k_idx = torch.cat([remap_outliers(block.k_idx, D, old_counts, old_shift), new_kidx])
        v_idx = torch.cat([remap_outliers(block.v_idx, D, old_counts, old_shift), new_vidx])
        k_val = torch.cat([block.k_val, pre[nk_t, nk_c].half()])
        v_val = torch.cat([block.v_val, values[nv_t, nv_c].half()])
        firsts = seg_first.tolist()
        contiguous = block.host_starts is not None and all(
            n == 0 or f == s + o for f, s, o, n in zip(firsts, block.host_starts, old_counts, new_counts, strict=True)
        )
        per_row = [new_counts[b * H] for b in range(B)]  # decode flushes: the same count on every head of a row
        host_next = tuple(n + c for n, c in zip(block.host_next, per_row, strict=True))
        span = block.host_span
        if N:
            last = max(f + n - 1 for f, n in zip(firsts, new_counts, strict=True))
            span = (min(span[0], min(firsts)), max(span[1], last))
        return KVQuantBlock(
            lengths=block.lengths + lengths, bits=block.bits, inv_freq=block.inv_freq, rope_scaling=block.rope_scaling,
            kcodes=interleave_rows(block.kcodes, old_counts, pack(kcodes, block.bits), new_counts),
            kmid=block.kmid, khalf=block.khalf, kscale=block.kscale, koff=block.koff,
            k_idx=k_idx, k_val=k_val,
            vcodes=interleave_rows(block.vcodes, old_counts, pack(vcodes, block.bits), new_counts),
            vscale=interleave_rows(block.vscale, old_counts, vscale, new_counts),
            voff=interleave_rows(block.voff, old_counts, voff, new_counts),
            v_idx=v_idx, v_val=v_val,
            pos_start=block.pos_start if contiguous else None,
            pos=None if contiguous else interleave_rows(block.positions().to(torch.int32), old_counts,
                                                         pos.to(torch.int32), new_counts),
            next_pos=block.next_pos + torch.tensor(per_row, dtype=torch.int32).to(dev, non_blocking=True),
            kcent=block.kcent, vcent=block.vcent,
            host_starts=block.host_starts if contiguous else None, host_next=host_next, host_span=span,
        )  # fmt: skip


def top_elements(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of the ``k`` largest elements of every row of ``score [N, D]``, in row-major order (a fixed
    count: no read of a data-dependent size)."""
    N, D = score.shape
    k = min(k, D)
    cols = score.topk(k, dim=1).indices.sort(dim=1).values
    return torch.arange(N, device=score.device).repeat_interleave(k), cols.flatten()


def row_outliers(mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask.nonzero(as_tuple=True)`` of a mask with exactly ``k`` True per row, without a device read."""
    N, D = mask.shape
    if k <= 0:
        empty = torch.zeros(0, dtype=torch.long, device=mask.device)
        return empty, empty
    cols = torch.where(mask, torch.arange(D, device=mask.device), D).sort(dim=1).values[:, :k]
    return torch.arange(N, device=mask.device).repeat_interleave(k), cols.flatten()


def formula_bits(bits: int, dim: int, tokens_per_head: int, fraction: float) -> float:
    """Expected bits per element of a KVQuant block without eviction (one segment per head, consecutive
    positions): codes, per-channel key parameters, per-token value scale/offset, outliers (fp16 + int32)."""
    keys = bits + 4 * 16 / tokens_per_head + round(fraction * tokens_per_head) * 48 / tokens_per_head
    values = bits + 2 * 16 / dim + round(fraction * dim) * 48 / dim
    return (keys + values) / 2 + 32 / (2 * tokens_per_head * dim)
