"""``qjl``: keys as sign bits of a Johnson–Lindenstrauss projection, read by QJL's inner-product estimator.

Paper: "QJL: 1-Bit Quantized JL Transform for KV Cache Quantization with Zero Overhead", Zandieh, Daliri,
Han, arXiv 2406.03482.

- A Gaussian matrix ``S [m, D]`` (i.i.d. N(0, 1), drawn from ``seed``; shared by every block and layer, like a
  model constant: regenerated, not stored per token) projects each key; the cache keeps ``sign(S k)`` packed
  eight per byte and ``‖k‖`` in fp16 — no per-group scale or zero-point.
- Attention logits use the paper's asymmetric estimator directly: the query is projected unquantized,
  ``⟨q, k⟩ ≈ sqrt(π/2) / m · ‖k‖ · ⟨S q, sign(S k)⟩`` (unbiased; variance ≤ π/(2m)·‖q‖²‖k‖²).
- Outliers (the paper's practical refinement): per head, the ``outliers`` key channels of largest norm over the
  context are sketched separately by their own Gaussian matrix (``out_sketch`` rows) with their own norm; the
  inlier estimate uses the query with those channels zeroed. The two estimates add up (both unbiased) and the
  cross terms of the variance disappear.
- Values: per-token uniform quantization (``value_bits``, channel groups of ``size``), as in the paper.
- ``sketch`` (m) defaults to 2 × head_dim (the paper uses m = 256 for d = 128); decoding appends groups of
  ``group`` tokens after ``residual`` full-precision ones, sketched with the block's outlier channels.

Deviations: outlier channels are chosen per head on the context being compressed (not per layer group of
heads). ``materialize`` returns ``sqrt(π/2)/m·‖k‖·Sᵀ sign(Sk)`` (per part), the key whose dot product with any
query equals the estimator (used only by callers that need flat keys, e.g. ragged fallbacks).
"""

from __future__ import annotations

import math

import torch

from kvsqueeze.codecs.base import Codec
from kvsqueeze.codecs.packing import pack, unpack_float
from kvsqueeze.codecs.quant import Bits, TokenQ, interleave
from kvsqueeze.core.storage import DenseBlock, KVBlock
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import register

_MATRICES: dict[tuple, torch.Tensor] = {}


def jl_matrix(seed: int, m: int, d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The Gaussian JL matrix ``[m, d]`` of ``seed`` (deterministic; cached per process)."""
    key = (seed, m, d, str(device))
    if key not in _MATRICES:
        gen = torch.Generator().manual_seed(int(seed))
        _MATRICES[key] = torch.randn(m, d, generator=gen).to(device)
    return _MATRICES[key]


def qjl_estimate(q: torch.Tensor, signs: torch.Tensor, norms: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Estimator of ``q · kᵀ``: ``q [..., M, D]``, ``signs [..., L, m]`` (±1), ``norms [..., L]`` → ``[..., M, L]``."""
    m = S.shape[0]
    sq = torch.matmul(q.float(), S.t())
    return torch.matmul(sq, signs.transpose(-1, -2)) * (norms.unsqueeze(-2) * (math.sqrt(math.pi / 2) / m))


def _sketch(x: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sign bits of ``x S^T`` and fp16 norms of ``x`` (flat ``[N, d]``)."""
    signs = pack((torch.matmul(x, S.t()) >= 0).to(torch.uint8), 1)
    return signs, x.norm(dim=-1).clamp(max=65504.0).half()


def _per_token(per_head: torch.Tensor, counts: list[int]) -> torch.Tensor:
    rep = torch.tensor(counts, device=per_head.device)
    return per_head.long().repeat_interleave(rep, dim=0, output_size=sum(counts))


class QJLBlock(KVBlock):
    """Inlier keys: ``signs [N, m/8]`` (1 bit per projection) + ``norms [N]`` fp16; outlier channels
    ``out_idx [BH, o]`` uint8 with their own sketch ``out_signs [N, m_o/8]`` + ``out_norms``; values :class:`TokenQ`."""

    def __init__(self, signs, norms, out_idx, out_signs, out_norms, values: TokenQ, lengths, seed, sketch, out_sketch):
        self.signs, self.norms, self.values, self.lengths = signs, norms, values, lengths.cpu()
        self.out_idx, self.out_signs, self.out_norms = out_idx, out_signs, out_norms
        self.seed, self.sketch, self.out_sketch, self.dim = seed, sketch, out_sketch, values.dim

    @classmethod
    def encode(cls, keys, values, lengths, out_idx, seed, sketch, out_sketch, value_bits, size) -> QJLBlock:
        D = keys.shape[-1]
        counts = lengths.flatten().tolist()
        k = keys.float()
        o = out_idx.shape[1]
        out_signs = out_norms = None
        if o:
            idx = _per_token(out_idx, counts)
            out_signs, out_norms = _sketch(k.gather(1, idx), jl_matrix(seed + 1, out_sketch, o, k.device))
            k = k.scatter(1, idx, 0.0)
        signs, norms = _sketch(k, jl_matrix(seed, sketch, D, k.device))
        v = TokenQ.encode(values, value_bits, size)
        return cls(signs, norms, out_idx, out_signs, out_norms, v, lengths, seed, sketch, out_sketch)

    @staticmethod
    def _pm(packed: torch.Tensor, m: int) -> torch.Tensor:
        return unpack_float(packed, 1, m) * 2 - 1

    def materialize(self, dtype):
        """Keys whose dot product with any query equals the estimator (inlier and outlier parts)."""
        c = math.sqrt(math.pi / 2)
        S = jl_matrix(self.seed, self.sketch, self.dim, self.signs.device)
        keys = torch.matmul(self._pm(self.signs, self.sketch), S) * (self.norms.float()[:, None] * c / self.sketch)
        if self.out_signs is not None:
            o = self.out_idx.shape[1]
            idx = _per_token(self.out_idx, self.lengths.flatten().tolist())
            S_o = jl_matrix(self.seed + 1, self.out_sketch, o, keys.device)
            k_o = torch.matmul(self._pm(self.out_signs, self.out_sketch), S_o)
            keys = keys.scatter(1, idx, k_o * (self.out_norms.float()[:, None] * c / self.out_sketch))
        return keys.to(dtype), self.values.dequant(dtype)

    def _logits(self, q: torch.Tensor, idx: torch.Tensor, sl: slice, L: int) -> torch.Tensor:
        """Estimated ``q · k`` for queries ``q [G, M, D]`` over tokens ``sl`` (``G`` heads of ``L`` tokens each)."""
        G, M, D = q.shape
        signs = self._pm(self.signs[sl], self.sketch).view(G, L, -1)
        q_in = q
        out = None
        if self.out_signs is not None:
            gidx = idx.long()[:, None, :].expand(G, M, idx.shape[1])
            q_in = q.scatter(2, gidx, 0.0)
            S_o = jl_matrix(self.seed + 1, self.out_sketch, idx.shape[1], q.device)
            s_o = self._pm(self.out_signs[sl], self.out_sketch).view(G, L, -1)
            out = qjl_estimate(q.gather(2, gidx), s_o, self.out_norms[sl].float().view(G, L), S_o)
        S = jl_matrix(self.seed, self.sketch, D, q.device)
        est = qjl_estimate(q_in, signs, self.norms[sl].float().view(G, L), S)
        return est if out is None else est + out

    def attend(self, q, scaling):
        B, H, M, D = q.shape
        values = self.values.dequant(torch.float32)
        qf = q.float().reshape(B * H, M, D)
        if self.uniform:
            L = int(self.lengths[0, 0])
            logits = self._logits(qf, self.out_idx, slice(None), L) * scaling
            lse = torch.logsumexp(logits, dim=-1)
            out = torch.matmul(torch.exp(logits - lse.unsqueeze(-1)), values.view(B * H, L, D))
            return out.view(B, H, M, D).to(q.dtype), lse.view(B, H, M)
        out = torch.zeros(B * H, M, D, device=q.device)
        lse = torch.full((B * H, M), float("-inf"), device=q.device)
        start = 0
        for i, n in enumerate(self.lengths.flatten().tolist()):
            if n:
                logits = self._logits(qf[i : i + 1], self.out_idx[i : i + 1], slice(start, start + n), n)[0] * scaling
                lse[i] = torch.logsumexp(logits, dim=-1)
                out[i] = torch.matmul(torch.exp(logits - lse[i].unsqueeze(-1)), values[start : start + n])
            start += n
        return out.view(B, H, M, D).to(q.dtype), lse.view(B, H, M)

    def merge(self, newer: QJLBlock) -> QJLBlock:
        a, b = self.lengths.flatten().tolist(), newer.lengths.flatten().tolist()
        has_out = self.out_signs is not None
        return QJLBlock(
            interleave(self.signs, a, newer.signs, b),
            interleave(self.norms, a, newer.norms, b),
            self.out_idx,
            interleave(self.out_signs, a, newer.out_signs, b) if has_out else None,
            interleave(self.out_norms, a, newer.out_norms, b) if has_out else None,
            self.values.merge(a, newer.values, b),
            self.lengths + newer.lengths,
            self.seed,
            self.sketch,
            self.out_sketch,
        )


@register
class QJLCodec(Codec):
    name = "qjl"
    family = "quantization"
    paper = "QJL: 1-Bit Quantized JL Transform for KV Cache Quantization with Zero Overhead"
    arxiv = "2406.03482"

    sketch: int = 0
    outliers: int = 4
    out_sketch: int = 32
    value_bits: Bits = 2
    size: int = 32
    seed: int = 0
    group: int = 32

    def check(self) -> None:
        super().check()
        if self.sketch < 0 or self.sketch % 8 or self.out_sketch < 8 or self.out_sketch % 8 or self.outliers < 0:
            raise KVSqueezeError(
                f"qjl needs sketch=0 (2 x head_dim) or a positive multiple of 8, out_sketch a positive multiple of 8 "
                f"and outliers >= 0, got sketch={self.sketch}, out_sketch={self.out_sketch}, outliers={self.outliers}"
            )

    def check_head_dim(self, head_dim: int) -> None:
        self._sizes(head_dim)

    def _sizes(self, D: int) -> tuple[int, int, int]:
        m = self.sketch or 2 * D
        if m % 8:
            raise KVSqueezeError(f"qjl sketch 2 x head_dim = {m} is not a multiple of 8; give sketch=N (8, 16, …)")
        if self.outliers >= D or D > 256:
            raise KVSqueezeError(f"qjl outliers must be in [0, head_dim) with head_dim <= 256, got {self.outliers}")
        return m, min(self.size, D) if self.size else D, self.outliers

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        if ctx is None:  # decode-time flush: sketched by extend() with the block's outlier channels
            return DenseBlock(keys, values, lengths)
        D = keys.shape[-1]
        m, size, o = self._sizes(D)
        counts = lengths.flatten().tolist()
        out_idx = torch.stack(
            [
                k_h.float().norm(dim=0).topk(o).indices.sort().values
                if k_h.shape[0]
                else torch.arange(o, device=keys.device)
                for k_h in keys.split(counts)
            ]
        ).to(torch.uint8)
        return QJLBlock.encode(keys, values, lengths, out_idx, self.seed, m, self.out_sketch, self.value_bits, size)

    def extend(self, block, newer):
        if isinstance(block, QJLBlock) and isinstance(newer, DenseBlock):
            m, size, _ = self._sizes(block.dim)
            new = QJLBlock.encode(
                newer.keys,
                newer.values,
                newer.lengths,
                block.out_idx,
                block.seed,
                m,
                block.out_sketch,
                self.value_bits,
                size,
            )
            return block.merge(new)
        return None
