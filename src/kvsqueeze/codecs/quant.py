"""Uniform asymmetric quantization with packed codes: the storage shared by the integer codecs.

A tensor ``x [N, D]`` of flat tokens (row, head, token order) is stored as

- :class:`TokenQ` — per-token: each token's channels in groups of ``size``, one fp16 scale and zero per group;
- :class:`ChannelQ` — per-channel: each (row, head)'s tokens in groups of ``group`` consecutive tokens, one fp16
  scale and zero per (group, channel); the last group of a head may be shorter.

Codes ``c = round((x - zero) / scale)`` in ``[0, 2**bits - 1]`` are bit-packed (:mod:`kvsqueeze.codecs.packing`);
``x̂ = c * scale + zero``. Zero is rounded down and scale up when cast to fp16 so that every element lies in the
representable range: the error is at most ``scale / 2`` per element.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import AfterValidator

from kvsqueeze.codecs.packing import pack, unpack_float
from kvsqueeze.core.attention_math import fused_partial_attention
from kvsqueeze.core.layer import CompressedLayer
from kvsqueeze.core.storage import KVBlock, interleave_segments
from kvsqueeze.errors import KVSqueezeError

FP16_MAX = 65504.0


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) covering ``[lo, hi]`` with ``2**bits`` levels: zero ≤ lo, zero + qmax·scale ≥ hi."""
    qmax = (1 << bits) - 1
    lo = lo.float().clamp(-FP16_MAX, FP16_MAX)
    hi = hi.float().clamp(-FP16_MAX, FP16_MAX)
    zero = lo.half()
    zero = torch.where(zero.float() > lo, torch.nextafter(zero, torch.full_like(zero, -float("inf"))), zero)
    scale = (hi - zero.float()).clamp(min=0) / qmax
    s16 = scale.half()
    s16 = torch.where(s16.float() < scale, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
    return s16, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (uint8) of ``x`` for broadcastable fp16 ``scale``/``zero``."""
    s = scale.float()
    q = (x.float() - zero.float()) / torch.where(s > 0, s, torch.ones_like(s))
    return q.round_().clamp_(0, (1 << bits) - 1).to(torch.uint8)


def interleave(a: torch.Tensor, a_counts: list[int], b: torch.Tensor, b_counts: list[int]) -> torch.Tensor:
    """Concatenate per-(row, head) segments: ``a``'s segment i, then ``b``'s segment i, for every i (one gather)."""
    return interleave_segments(a, a_counts, b, b_counts)


def token_groups(lengths: torch.Tensor, group: int) -> tuple[torch.Tensor, list[int]]:
    """Sizes of consecutive token groups of every (row, head) segment, and the number of groups per segment (host
    arithmetic on the CPU lengths, no loop over segments)."""
    flat = lengths.flatten().long().cpu()
    full, rest = flat // group, flat % group
    counts = full + (rest > 0).long()
    seg = torch.repeat_interleave(torch.arange(flat.numel()), counts)
    first = torch.cumsum(counts, 0) - counts
    j = torch.arange(seg.numel()) - first[seg]
    sizes = torch.where(j < full[seg], torch.full_like(j, group), rest[seg])
    return sizes.to(torch.int16), counts.tolist()


def group_pattern(sizes: torch.Tensor) -> tuple[int, ...]:
    """``sizes`` (int16, on the CPU) as Python ints."""
    return tuple(sizes.tolist())


def check_bits(bits: int, allowed: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)) -> None:
    if bits not in allowed:
        raise KVSqueezeError(f"bits must be one of {', '.join(map(str, allowed))}, got {bits}")


def _bits_2348(value: int) -> int:
    if value not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {value}")
    return value


Bits = Annotated[int, AfterValidator(_bits_2348)]  # spec field type: a supported integer bit width


class TokenQ:
    """Per-token quantization: ``codes [N, ⌈D/8⌉·bits]`` packed, ``scale/zero [N, D/size]`` fp16."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dim: int, size: int):
        self.codes, self.scale, self.zero = codes, scale, zero
        self.bits, self.dim, self.size = bits, dim, size

    @classmethod
    def encode(cls, x: torch.Tensor, bits: int, size: int = 0) -> TokenQ:
        N, D = x.shape
        size = size or D
        if D % size:
            raise KVSqueezeError(f"channel group size {size} must divide the head dimension {D}")
        xs = x.float().view(N, D // size, size)
        scale, zero = affine_params(xs.amin(-1), xs.amax(-1), bits)
        codes = quantize_codes(xs, scale[..., None], zero[..., None], bits).view(N, D)
        return cls(pack(codes, bits), scale, zero, bits, D, size)

    @property
    def tokens(self) -> int:
        return self.codes.shape[0]

    def dequant(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N = self.codes.shape[0]
        c = unpack_float(self.codes, self.bits, self.dim, dtype).view(N, -1, self.size)
        return torch.addcmul(self.zero.to(dtype)[..., None], c, self.scale.to(dtype)[..., None]).view(N, self.dim)

    def scores(self, q: torch.Tensor, BH: int, L: int) -> torch.Tensor:
        """``q [BH, M, D] · dequant()ᵀ`` → ``[BH, M, L]`` without materializing keys: q·(s c + z) = s (q·c) + z Σq."""
        G, g = self.dim // self.size, self.size
        C = unpack_float(self.codes, self.bits, self.dim).view(BH, L, G, g)
        s, z = self.scale.float().view(BH, 1, L, G), self.zero.float().view(BH, 1, L, G)
        qg = q.view(BH, -1, G, g)
        out = None
        for j in range(G):
            raw = torch.matmul(qg[:, :, j], C[:, :, j].transpose(1, 2))
            part = torch.addcmul(raw * s[..., j], qg[:, :, j].sum(-1, keepdim=True), z[..., j])
            out = part if out is None else out + part
        return out

    def weighted(self, p: torch.Tensor, BH: int, L: int) -> torch.Tensor:
        """``p [BH, M, L] @ dequant()`` → ``[BH, M, D]``: Σ p s c + Σ p z, per channel group."""
        G, g = self.dim // self.size, self.size
        C = unpack_float(self.codes, self.bits, self.dim).view(BH, L, G, g)
        s, z = self.scale.float().view(BH, L, G), self.zero.float().view(BH, L, G)
        parts = [torch.matmul(p * s[:, None, :, j], C[:, :, j]) + torch.matmul(p, z[:, :, j, None]) for j in range(G)]
        return torch.cat(parts, dim=-1) if G > 1 else parts[0]

    def merge(self, counts: list[int], newer: TokenQ, newer_counts: list[int]) -> TokenQ:
        """This storage followed, per (row, head) segment, by ``newer``'s."""
        return TokenQ(
            interleave(self.codes, counts, newer.codes, newer_counts),
            interleave(self.scale, counts, newer.scale, newer_counts),
            interleave(self.zero, counts, newer.zero, newer_counts),
            self.bits,
            self.dim,
            self.size,
        )


class ChannelQ:
    """Per-channel quantization over groups of consecutive tokens of one (row, head).

    ``codes [N, ⌈D/8⌉·bits]`` packed per token, ``scale/zero [G, D]`` fp16, ``sizes [G]`` int16 tokens per group,
    ``counts``: groups per (row, head) segment (plain list, like ``lengths``).
    """

    def __init__(self, codes, scale, zero, sizes, counts: list[int], bits: int, dim: int):
        self.codes, self.scale, self.zero, self.sizes, self.counts = codes, scale, zero, sizes, counts
        self.bits, self.dim = bits, dim

    def pattern(self) -> tuple[int, ...]:
        """Group sizes as Python ints, read once per storage (cached next to the tensor they describe)."""
        cached = self.__dict__.get("pattern_of")
        if cached is None or cached[0] is not self.sizes:
            cached = self.__dict__["pattern_of"] = (self.sizes, group_pattern(self.sizes))
        return cached[1]

    def full_groups(self, group: int | None = None) -> int:
        """The common group size when every group has it (0 otherwise)."""
        pattern = self.pattern()
        g = pattern[0] if pattern else 1
        return g if all(x == g for x in pattern) and (group is None or g == group) else 0

    @classmethod
    def encode(cls, x: torch.Tensor, lengths: torch.Tensor, bits: int, group: int) -> ChannelQ:
        N, D = x.shape
        sizes, counts = token_groups(lengths, group)
        xf = x.float()
        flat = lengths.flatten().long().cpu()
        host = tuple(flat.tolist())
        if all(n % group == 0 for n in host):
            xs = xf.view(-1, group, D)
            lo, hi = xs.amin(1), xs.amax(1)
        elif N and len(set(host)) == 1:  # equal heads: whole groups then one short group, per head
            full, rest = divmod(host[0], group)
            xs = xf.view(flat.numel(), -1, D)
            runs = [xs[:, : full * group].reshape(xs.shape[0], full, group, D)] if full else []
            runs += [xs[:, None, full * group :]] if rest else []
            lo = torch.cat([r.amin(2) for r in runs], 1).view(-1, D)
            hi = torch.cat([r.amax(2) for r in runs], 1).view(-1, D)
        else:
            gidx = torch.repeat_interleave(torch.arange(len(sizes), device=x.device), sizes.long().to(x.device))
            lo = torch.full((len(sizes), D), float("inf"), device=x.device)
            hi = torch.full((len(sizes), D), -float("inf"), device=x.device)
            lo = lo.scatter_reduce(0, gidx[:, None].expand(N, D), xf, "amin")
            hi = hi.scatter_reduce(0, gidx[:, None].expand(N, D), xf, "amax")
        scale, zero = affine_params(lo, hi, bits)
        out = cls(None, scale, zero, sizes, counts, bits, D)
        s_tok, z_tok = out.expand(scale, zero, group)
        out.codes = pack(quantize_codes(xf, s_tok, z_tok, bits), bits)
        return out

    def expand(self, scale, zero, group: int | None = None):
        """Per-group ``scale``/``zero`` repeated for every token of its group."""
        g = self.full_groups(group)
        if g:
            return scale.repeat_interleave(g, 0), zero.repeat_interleave(g, 0)
        pattern = self.pattern()
        rep = torch.tensor(pattern, dtype=torch.long).to(scale.device, non_blocking=True)
        n = sum(pattern)
        return scale.repeat_interleave(rep, 0, output_size=n), zero.repeat_interleave(rep, 0, output_size=n)

    @property
    def tokens(self) -> int:
        return self.codes.shape[0]

    def dequant(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        c = unpack_float(self.codes, self.bits, self.dim, dtype)
        g = self.full_groups()
        scale, zero = self.scale.to(dtype), self.zero.to(dtype)
        if g:  # uniform groups: broadcast, no gather
            view = c.view(-1, g, self.dim)
            return torch.addcmul(zero[:, None], view, scale[:, None]).view(-1, self.dim)
        runs = self.runs()
        if runs is not None:  # every head has the same group pattern: one broadcast addcmul per run, in place
            BH, n_g = len(self.counts), self.counts[0]
            c = c.contiguous()
            c3, s3, z3 = c.view(BH, -1, self.dim), scale.view(BH, n_g, self.dim), zero.view(BH, n_g, self.dim)
            tok = 0
            for g0, n, size in runs:
                part = c3[:, tok : tok + n * size].view(BH, n, size, self.dim)
                torch.addcmul(z3[:, g0 : g0 + n, None], part, s3[:, g0 : g0 + n, None], out=part)
                tok += n * size
            return c
        s, z = self.expand(scale, zero)
        return torch.addcmul(z, c, s)

    def runs(self) -> list[tuple[int, int, int]] | None:
        """(first group, groups, group size) runs of one head's groups, when every head has the same pattern."""
        n = self.counts[0]
        if any(c != n for c in self.counts):
            return None
        sizes = self.pattern()
        pattern = list(sizes[:n])
        if list(sizes) != pattern * len(self.counts):
            return None
        runs, start = [], 0
        for i in range(1, n + 1):
            if i == n or pattern[i] != pattern[start]:
                runs.append((start, i - start, pattern[start]))
                start = i
        return runs

    def scores(self, q: torch.Tensor, BH: int, L: int) -> torch.Tensor:
        """``q [BH, M, D] · dequant()ᵀ`` → ``[BH, M, L]``: per group, (q ⊙ s_g)·c + q·z_g (no dequantized keys)."""
        runs = self.runs()
        if runs is None:
            return torch.matmul(q, self.dequant(torch.float32).view(BH, L, -1).transpose(1, 2))
        D, M = self.dim, q.shape[1]
        C = unpack_float(self.codes, self.bits, D).view(BH, L, D)
        n_g = self.counts[0]
        s, z = self.scale.float().view(BH, n_g, D), self.zero.float().view(BH, n_g, D)
        bias = torch.matmul(q, z.transpose(1, 2))  # [BH, M, n_g]
        parts, tok = [], 0
        for g0, n, size in runs:
            c = C[:, tok : tok + n * size].reshape(BH, n, size, D)
            qs = q[:, None] * s[:, g0 : g0 + n, None, :]  # [BH, n, M, D]
            raw = torch.matmul(c, qs.transpose(-1, -2))  # [BH, n, size, M]
            raw = raw + bias[:, :, g0 : g0 + n].transpose(1, 2)[:, :, None, :]
            parts.append(raw.permute(0, 3, 1, 2).reshape(BH, M, n * size))
            tok += n * size
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def weighted(self, p: torch.Tensor, BH: int, L: int) -> torch.Tensor:
        return torch.matmul(p, self.dequant(torch.float32).view(BH, L, -1))

    def merge(self, counts: list[int], newer: ChannelQ, newer_counts: list[int]) -> ChannelQ:
        return ChannelQ(
            interleave(self.codes, counts, newer.codes, newer_counts),
            interleave(self.scale, self.counts, newer.scale, newer.counts),
            interleave(self.zero, self.counts, newer.zero, newer.counts),
            interleave(self.sizes, self.counts, newer.sizes, newer.counts),
            [a + b for a, b in zip(self.counts, newer.counts, strict=True)],
            self.bits,
            self.dim,
        )


class QuantBlock(KVBlock):
    """Kept tokens as packed quantized keys and values (each a :class:`TokenQ` or :class:`ChannelQ`)."""

    def __init__(self, keys: TokenQ | ChannelQ, values: TokenQ | ChannelQ, lengths: torch.Tensor):
        self.keys, self.values, self.lengths = keys, values, lengths.cpu()
        self.dim = keys.dim

    def bits_per_element(self) -> float:
        """Bytes held × 8 per stored key/value element, all metadata included."""
        return bits_per_element(self)

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys.dequant(dtype), self.values.dequant(dtype)

    def attend(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over the block. On the CPU: keys and values dequantized (transiently, float32) in a few
        whole-block operations, then one fused attention kernel for all heads (fewer, larger kernels than attending
        from the codes group by group: what a small decode step costs on a CPU). On other devices: from the codes
        (:meth:`attend_from_codes`: scales folded into the query and the probabilities, no dequantized keys or
        values). Both equal the reference over :meth:`materialize` within float32 rounding (tested)."""
        if not self.uniform:
            return super().attend(q, scaling)
        grouped = not isinstance(self.keys, ChannelQ) or self.keys.runs() is not None  # per-run folding applies
        if q.device.type != "cpu" and isinstance(self.keys, (TokenQ, ChannelQ)) and grouped:
            return self.attend_from_codes(q, scaling)
        B, H = self.lengths.shape
        L, D = self.host.width, self.dim
        keys, values = self.keys.dequant(torch.float32), self.values.dequant(torch.float32)  # the codes as stored
        out, lse = fused_partial_attention(q.float(), keys.view(B, H, L, D), values.view(B, H, L, D), scaling)
        return out.to(q.dtype), lse

    def attend_from_codes(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention read straight from the packed codes (scales folded into the products), uniform heads: never
        holds dequantized keys/values, at the price of many small kernels per call."""
        B, H = self.lengths.shape
        L, M, D = self.host.width, q.shape[2], q.shape[3]
        qf = q.float().reshape(B * H, M, D)
        logits = self.keys.scores(qf, B * H, L) * scaling
        lse = torch.logsumexp(logits, dim=-1)
        probs = torch.exp(logits - lse.unsqueeze(-1))
        out = self.values.weighted(probs, B * H, L)
        return out.view(B, H, M, -1).to(q.dtype), lse.view(B, H, M)

    def merge(self, newer: QuantBlock) -> QuantBlock:
        a, b = list(self.host.counts), list(newer.host.counts)
        if type(self.keys) is not type(newer.keys) or type(self.values) is not type(newer.values):
            raise TypeError("cannot merge blocks of different layouts")
        return QuantBlock(
            self.keys.merge(a, newer.keys, b), self.values.merge(a, newer.values, b), self.lengths + newer.lengths
        )


def bits_per_element(block: KVBlock) -> float:
    """Effective bits per stored key/value element of any block (8 × bytes held / (2 × tokens × head dim))."""
    n = int(block.lengths.sum())
    if n == 0:
        return 0.0
    dim = getattr(block, "dim", None) or block.materialize(torch.float32)[0].shape[-1]
    return 8.0 * block.nbytes() / (2 * n * dim)


def effective_bits(cache) -> float:
    """Bits per key/value element a :class:`~kvsqueeze.core.cache.CompressedCache` holds for the tokens it keeps:
    8 × ``cache.nbytes()`` / (2 × kept tokens × head dim), every block's metadata and the full-precision tail
    (residual window) included."""
    elements = 0
    for layer in cache.layers:
        if isinstance(layer, CompressedLayer) and layer.is_initialized:
            elements += 2 * int(layer.kept_lengths().sum()) * layer.keys.shape[-1]
        elif getattr(layer, "is_initialized", False):
            elements += layer.keys.numel() + layer.values.numel()
    return 8.0 * cache.nbytes() / elements if elements else 0.0
