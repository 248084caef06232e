"""``qjl``: keys as sign bits of a Johnson–Lindenstrauss projection, read by QJL's inner-product estimator.

Paper: "QJL: 1-Bit Quantized JL Transform for KV Cache Quantization with Zero Overhead", Zandieh, Daliri,
Han, arXiv 2406.03482.

- A Gaussian matrix ``S [m, D]`` (i.i.d. N(0, 1), drawn from ``seed``; shared by every block and layer, like a
  model constant: regenerated, not stored per token) projects each key; the cache keeps ``sign(S k)`` packed
  eight per byte and ``‖k‖`` in fp16 — no per-group scale or zero-point.
- Attention logits use the paper's asymmetric estimator directly: the query is projected unquantized,
  ``⟨q, k⟩ ≈ sqrt(π/2) / m · ‖k‖ · ⟨S q, sign(S k)⟩`` (unbiased; variance ≤ π/(2m)·‖q‖²‖k‖²).
- Values: per-token uniform quantization (``value_bits``, channel groups of ``size``), as in the paper.
- ``sketch`` (m) defaults to 2 × head_dim (the paper uses m = 256 for d = 128); decoding appends groups of
  ``group`` tokens after ``residual`` full-precision ones.

Deviations: the paper additionally detects a few outlier key channels per layer and sketches them separately
with their own norm; that is not done here. ``materialize`` returns ``sqrt(π/2)/m·‖k‖·Sᵀ sign(Sk)``, the key
whose dot product with any query equals the estimator (used only by callers that need flat keys).
"""

from __future__ import annotations

import math

import torch

from kvsqueeze.codecs.base import Codec, KVBlock, tensor_bytes
from kvsqueeze.codecs.packing import pack, unpack_float
from kvsqueeze.codecs.quant import Bits, TokenQ, interleave
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


class QJLBlock(KVBlock):
    """``signs [N, m/8]`` uint8 (1 bit per projection), ``norms [N]`` fp16, values as :class:`TokenQ`."""

    def __init__(self, signs, norms, values: TokenQ, lengths, seed: int, sketch: int):
        self.signs, self.norms, self.values, self.lengths = signs, norms, values, lengths.cpu()
        self.seed, self.sketch, self.dim = seed, sketch, values.dim

    def nbytes(self) -> int:
        return tensor_bytes(self.signs, self.norms) + self.values.nbytes()

    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes() / (2 * max(int(self.lengths.sum()), 1) * self.dim)

    def _signs(self) -> torch.Tensor:
        return unpack_float(self.signs, 1, self.sketch) * 2 - 1

    def materialize(self, dtype):
        S = jl_matrix(self.seed, self.sketch, self.dim, self.signs.device)
        scale = self.norms.float()[:, None] * (math.sqrt(math.pi / 2) / self.sketch)
        keys = torch.matmul(self._signs(), S) * scale
        return keys.to(dtype), self.values.dequant(dtype)

    def attend(self, q, scaling):
        S = jl_matrix(self.seed, self.sketch, self.dim, q.device)
        signs, norms, values = self._signs(), self.norms.float(), self.values.dequant(q.dtype)
        B, H = self.lengths.shape
        if self.uniform:
            L = int(self.lengths[0, 0])
            logits = qjl_estimate(q, signs.view(B, H, L, -1), norms.view(B, H, L), S) * scaling
            lse = torch.logsumexp(logits, dim=-1)
            probs = torch.exp(logits - lse.unsqueeze(-1)).to(values.dtype)
            return torch.matmul(probs, values.view(B, H, L, -1)), lse
        out = torch.zeros(*q.shape[:-1], self.dim, dtype=q.dtype, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)
        sizes = self.lengths.flatten().tolist()
        parts = zip(signs.split(sizes), norms.split(sizes), values.split(sizes), strict=True)
        for i, (s_h, n_h, v_h) in enumerate(parts):
            if s_h.shape[0]:
                b, h = divmod(i, H)
                logits = qjl_estimate(q[b, h], s_h, n_h, S) * scaling
                lse[b, h] = torch.logsumexp(logits, dim=-1)
                out[b, h] = torch.matmul(torch.exp(logits - lse[b, h].unsqueeze(-1)).to(v_h.dtype), v_h)
        return out, lse

    def merge(self, newer: QJLBlock) -> QJLBlock:
        a, b = self.lengths.flatten().tolist(), newer.lengths.flatten().tolist()
        return QJLBlock(
            interleave(self.signs, a, newer.signs, b),
            interleave(self.norms, a, newer.norms, b),
            self.values.merge(a, newer.values, b),
            self.lengths + newer.lengths,
            self.seed,
            self.sketch,
        )


@register
class QJLCodec(Codec):
    name = "qjl"
    family = "codec"
    paper = "QJL: 1-Bit Quantized JL Transform for KV Cache Quantization with Zero Overhead"
    arxiv = "2406.03482"

    sketch: int = 0
    value_bits: Bits = 2
    size: int = 32
    seed: int = 0
    group: int = 32

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        D = keys.shape[-1]
        m = self.sketch or 2 * D
        if m % 8 or m < 8:
            raise KVSqueezeError(f"qjl sketch must be a positive multiple of 8, got {m}")
        S = jl_matrix(self.seed, m, D, keys.device)
        signs = pack((torch.matmul(keys.float(), S.t()) >= 0).to(torch.uint8), 1)
        norms = keys.float().norm(dim=-1).clamp(max=65504.0).half()
        size = min(self.size, D) if self.size else D
        return QJLBlock(signs, norms, TokenQ.encode(values, self.value_bits, size), lengths, self.seed, m)

    def extend(self, block, newer):
        if isinstance(block, QJLBlock) and isinstance(newer, QJLBlock) and block.seed == newer.seed:
            return block.merge(newer)
        return None
