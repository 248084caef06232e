"""CSKV — "CSKV: Training-Efficient Channel Shrinking for KV Cache in Long-Context Scenarios"
(Wang et al., arXiv 2409.10593).

The paper observes that cached keys and values are low-rank along the channel axis, factorises the key and value
projections ``W ≈ A B`` (initialised by SVD/ASVD), stores only the low-dimension features ``x A`` and keeps a
*bi-branch* cache: the most recent tokens in full precision, older ones as compressed features.

Here, per layer and per KV head, orthonormal bases ``U_k [D, rank_k]`` and ``U_v [D, rank_v]`` are the top singular
vectors of the keys / values themselves (the SVD of the cached activations; ``U`` are the eigenvectors of
``Xᵀ X``). A block stores only the coordinates ``c_k = k U_k`` ``[N, rank_k]`` and ``c_v = v U_v`` ``[N, rank_v]``
plus the bases; attention is computed without reconstructing the keys::

    q·k̂ = (q U_k) · c_k,        out = softmax(...) c_v U_vᵀ

which equals exact attention over the reconstructed ``k̂ = c_k U_kᵀ``, ``v̂ = c_v U_vᵀ`` (and is exact at full rank).
The full-precision branch is the codec's residual window (``residual`` most recent tokens, projected ``group``
at a time once older).

Where the bases come from (``basis``):
- ``basis=PATH.pt`` — the paper's setting: fitted *offline* on calibration text. :mod:`kvsqueeze.calibration.cskv`
  runs the model over the offline essays, accumulates ``Xᵀ X`` of every layer's cached keys/values per KV head and
  saves all eigenvectors (any rank can be read back); the file is cached under
  ``cache_dir()/calibration/<model key>`` and
  keyed on the model's configuration and the calibration length. CLI: ``kvsqueeze calibrate cskv``.
- ``basis=context`` (default) — fitted on the prefill context itself, per (row, KV head). Not in the paper; it
  needs no calibration, adapts to the prompt, and its bases are stored in the block (counted in its bytes).

Deviations: training-free only — no layer-wise reconstruction fine-tuning (the paper's accuracy relies on it);
the low-rank map is fitted on the cached *post-RoPE* keys (the paper factorises the pre-RoPE key projection), so
the basis also has to absorb the rotation; no mean-centering (plain SVD, as the paper's initialisation);
file bases are shared per layer but counted in every block that uses them (one block per layer in practice, so
counted once per layer); tokens appended during decoding are projected onto the block's bases when flushed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from kvsqueeze.calibration.store import read_file
from kvsqueeze.codecs.base import Codec
from kvsqueeze.core.attention_math import partial_attention, ragged_attention
from kvsqueeze.core.storage import KVBlock, interleave_segments
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import register


def top_basis(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal top-``rank`` eigenvectors of a Gram ``[..., D, D]`` (right singular vectors): ``[..., D, r]``."""
    _, vecs = torch.linalg.eigh(gram.double())  # ascending eigenvalues
    return vecs[..., :, -rank:].flip(-1).float().contiguous()


def _head_grams(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``Xᵀ X`` of every (row, head) run of a flat ``[N, D]`` tensor: ``[B, H, D, D]``."""
    B, H = lengths.shape
    D = x.shape[-1]
    grams = torch.zeros(B * H, D, D, dtype=torch.float64, device=x.device)
    for i, part in enumerate(x.double().split(lengths.flatten().tolist())):
        if part.shape[0]:
            grams[i] = part.T @ part
    return grams.view(B, H, D, D)


class CSKVBlock(KVBlock):
    """Coordinates ``ck [N, rk]``, ``cv [N, rv]`` and bases ``uk [B, H, D, rk]``, ``uv [B, H, D, rv]``.

    ``uk``/``uv`` None: a decoding flush not yet projected (``ck``/``cv`` hold the raw keys/values until
    :meth:`CSKV.extend` projects them onto the layer's bases)."""

    def __init__(self, ck, cv, uk, uv, lengths: torch.Tensor):
        self.ck, self.cv, self.uk, self.uv, self.lengths = ck, cv, uk, uv, lengths.cpu()

    def _per_token(self, u: torch.Tensor) -> torch.Tensor:
        B, H = self.lengths.shape
        ids = torch.repeat_interleave(torch.arange(B * H), self.lengths.flatten()).to(u.device)
        return u.reshape(B * H, *u.shape[2:])[ids]

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructed ``k̂ = c_k U_kᵀ``, ``v̂ = c_v U_vᵀ`` (flat, transient)."""
        if self.uk is None:
            return self.ck.to(dtype), self.cv.to(dtype)
        k = torch.einsum("nr,ndr->nd", self.ck.float(), self._per_token(self.uk.float()))
        v = torch.einsum("nr,ndr->nd", self.cv.float(), self._per_token(self.uv.float()))
        return k.to(dtype), v.to(dtype)

    def attend(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.uk is None:
            return super().attend(q, scaling)
        B, H = q.shape[:2]
        uk, uv = self.uk.to(q.dtype), self.uv.to(q.dtype)
        q_low = torch.matmul(q, uk)  # [B, H, M, rk]: q projected onto the key basis
        ck, cv = self.ck.to(q.dtype), self.cv.to(q.dtype)
        host = self.host
        if host.uniform:
            L = host.width
            out, lse = partial_attention(q_low, ck.view(B, H, L, -1), cv.view(B, H, L, -1), scaling)
        else:  # ragged heads: one padded, masked call
            out, lse = ragged_attention(q_low, ck, cv, self.lengths, scaling, width=host.width)
        return torch.matmul(out, uv.transpose(-1, -2)), lse  # value coordinates back to the head dim


def _project(x: torch.Tensor, u: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Coordinates ``x U`` of a flat ``[N, D]`` run with per-(row, head) bases ``u [B, H, D, r]``."""
    B, H = lengths.shape
    ids = torch.repeat_interleave(torch.arange(B * H), lengths.flatten()).to(x.device)
    return torch.einsum("nd,ndr->nr", x.float(), u.reshape(B * H, *u.shape[2:]).float()[ids]).to(x.dtype)


def load_basis(path: str) -> dict:
    """A basis file written by ``kvsqueeze.calibration.cskv.fit_cskv`` (parsed once per version of the file)."""
    if not Path(path).expanduser().is_file():
        raise KVSqueezeError(f"cskv basis {path!r} not found; create it with `kvsqueeze calibrate cskv --out {path}`")
    return read_file(path, parse_basis)


def parse_basis(file: Path) -> dict:
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception:  # torch raises pickle, zip and runtime errors for a damaged file
        data = None
    if not isinstance(data, dict) or "keys" not in data or "values" not in data:
        raise KVSqueezeError(f"{file} is not a cskv basis file; rerun `kvsqueeze calibrate cskv`")
    return data


@register
class CSKV(Codec):
    name = "cskv"
    family = "low-rank"
    paper = "CSKV: Training-Efficient Channel Shrinking for KV Cache in Long-Context Scenarios"
    arxiv = "2409.10593"
    rank_k: int = Field(32, ge=1)
    rank_v: int = Field(32, ge=1)
    basis: str = "context"  # "context" (fit on the prefill keys) or a .pt file from fit_cskv
    residual: int = Field(32, ge=0)  # full-precision branch: most recent tokens
    group: int = Field(16, ge=1)  # appended tokens are projected this many at a time

    def check_head_dim(self, head_dim: int) -> None:
        if self.rank_k > head_dim or self.rank_v > head_dim:
            raise KVSqueezeError(
                f"cskv ranks ({self.rank_k}, {self.rank_v}) exceed the head dim {head_dim}; use ranks <= {head_dim}"
            )

    def _ranks(self, D: int) -> tuple[int, int]:
        self.check_head_dim(D)
        return self.rank_k, self.rank_v

    def _file_bases(self, layer: int, B: int, H: int, D: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        data = load_basis(self.basis)
        if layer >= len(data["keys"]) or data["keys"][layer] is None:
            raise KVSqueezeError(f"{self.basis} has no basis for layer {layer}; it was fitted for another model")
        uk, uv = data["keys"][layer], data["values"][layer]
        if uk.shape[0] != H or uk.shape[1] != D:
            raise KVSqueezeError(f"{self.basis} was fitted for another model (heads/head dim differ); refit it")
        rk, rv = self._ranks(D)
        uk = uk[:, :, :rk].to(device).contiguous().expand(B, -1, -1, -1)
        uv = uv[:, :, :rv].to(device).contiguous().expand(B, -1, -1, -1)
        return uk, uv

    def encode(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, ctx=None) -> KVBlock:
        B, H = lengths.shape
        D = keys.shape[-1]
        rk, rv = self._ranks(D)
        if self.basis != "context":
            layer = ctx.layer_idx if ctx is not None else None
            if layer is None:  # a decoding flush: projected by ``extend`` with the layer's bases
                return CSKVBlock(keys.contiguous(), values.contiguous(), None, None, lengths)
            uk, uv = self._file_bases(layer, B, H, D, keys.device)
        elif ctx is None:
            return CSKVBlock(keys.contiguous(), values.contiguous(), None, None, lengths)
        else:
            uk = top_basis(_head_grams(keys, lengths), rk).to(keys.dtype)
            uv = top_basis(_head_grams(values, lengths), rv).to(values.dtype)
        return CSKVBlock(_project(keys, uk, lengths), _project(values, uv, lengths), uk, uv, lengths)

    def extend(self, block: KVBlock, newer: KVBlock) -> KVBlock | None:
        if not isinstance(block, CSKVBlock) or not isinstance(newer, CSKVBlock) or block.uk is None:
            return None
        nk, nv = newer.ck, newer.cv
        if newer.uk is None:
            nk, nv = _project(nk, block.uk, newer.lengths), _project(nv, block.uv, newer.lengths)
        a, b = block.host.counts, newer.host.counts
        ck, cv = interleave_segments(block.ck, a, nk, b), interleave_segments(block.cv, a, nv, b)
        return CSKVBlock(ck, cv, block.uk, block.uv, block.lengths + newer.lengths)
