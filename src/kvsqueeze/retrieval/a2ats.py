"""``a2ats``: windowed RoPE and query-aware vector quantization of keys; codes hot, approximate scores pick the top-K
tokens, their exact keys and values fetched from the cold tier.

Paper: "A²ATS: Retrieval-Based KV Cache Reduction via Windowed Rotary Position Embedding and Query-Aware Vector
Quantization", He et al., arXiv 2502.12665 (read with the authors' released code).

- *Windowed RoPE* (WRoPE): tokens in the local window are attended exactly; for every other token the relative
  position between query and key is taken to be one constant ``distance`` (the paper's 2048), so keys can be coded
  without their position: the stored (post-RoPE) keys are rotated back to pre-RoPE (:mod:`kvsqueeze.core.rope`) and
  a decoding query at position ``m`` is rotated by ``distance - m`` (``R(distance) q_pre``). With exact keys the
  approximate score is then ``q·k`` at relative position ``distance``.
- *Query-aware vector quantization*: the objective is the error of the approximate score, ``E_q[(q·k - q·c)^2] =
  (k - c)^T H (k - c)`` with ``H = E[q q^T]`` over WRoPE-rotated queries; with the Cholesky factor ``H = L L^T``
  it is k-means of the whitened keys ``k L``. The codebook (``codebook`` centroids per (row, KV head), mapped back
  by ``L^{-1}``, at the model's dtype) and one code per token (``uint8`` up to 256 centroids, else ``int16``) are
  kept hot.
- Per decoding step the approximate scores ``q_w·c[code]`` (float32, a table lookup) pick the top-K tokens; their
  exact post-RoPE keys and values come from the cold tier (:class:`~kvsqueeze.core.tiers.ColdStore`, one token per
  page) and are attended with the ``sinks`` first tokens (kept hot exactly, the paper's attention sinks) and the
  local window (the cache's full-precision tail, ``residual`` tokens); K from the hot budget (``fetch=`` overrides).

Deviations: the paper fits one codebook per layer and KV head offline on calibration text (4096 centroids, the query
statistics of that text); here the codebook and ``H`` are fitted per context at prefill (``H`` from the context's own
queries that the schedule provides, pooled over the head's query heads; no queries: plain k-means), batched over
rows and heads, ``iters`` Lloyd iterations from evenly spaced tokens (not k-means++), default 128 centroids, so it
fits a hot budget of short contexts; the window distance defaults to 512 (the paper's 2048 is for 128k-token
models), the local window to 32 tokens and the sinks to 4 (the paper's 64 and 8). ``H`` is scaled to unit mean
diagonal and regularised by ``1e-4`` of it.
Grouped-query attention selects K tokens per KV head by the largest approximate score over the head's query heads
(the paper takes the union of each query head's top-K). Tokens decoded after the prefill stay in the hot window.
Full-attention RoPE models only; no custom kernels: selected tokens are gathered and attended with PyTorch.
"""

from __future__ import annotations

import torch

from kvsqueeze.core.attention_math import partial_attention
from kvsqueeze.core.rope import rope_params, rotate_half_pairs, unrope
from kvsqueeze.core.storage import KVBlock
from kvsqueeze.core.tiers import ColdStore, paginate, unpaginate
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.models import head_dim_of
from kvsqueeze.retrieval.base import RetrievalCodec, top_pages
from kvsqueeze.retrieval.kmeans import kmeans
from kvsqueeze.spec import register

ROPE = "a2ats_rope"  # shared_state: (inverse frequencies, attention scaling) of the model's RoPE


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` rotated by RoPE angles of ``positions [...]`` (float32, half-split pairs; may be negative)."""
    ang = positions.float()[..., None] * inv_freq.float()
    return rotate_half_pairs(x.float(), ang.cos(), ang.sin())


def query_cholesky(ctx, H: int, D: int, positions: torch.Tensor, inv_freq, distance: int, device) -> torch.Tensor:
    """Lower Cholesky factor ``[B, H, D, D]`` (float32) of ``E[q_w q_w^T]`` over the context's WRoPE-rotated queries
    (pooled over each KV head's query heads); the identity when the schedule gives no queries."""
    B = positions.shape[0]
    eye = torch.eye(D, device=device, dtype=torch.float64)
    q = ctx.queries
    if q is None or q.shape[2] == 0:
        return eye.float().expand(B, H, D, D).contiguous()
    Lq = q.shape[2]
    qpos = positions[:, -Lq:].to(device)[:, None, :]
    valid = ctx.valid[:, -Lq:].to(device)[:, None, :, None]
    qw = (rotate(q.to(device), distance - qpos, inv_freq) * valid).reshape(B, H, -1, D).double()
    stat = qw.transpose(-1, -2) @ qw  # [B, H, D, D]
    scale = stat.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-30)[..., None, None]
    stat = stat / scale + 1e-4 * eye
    return torch.linalg.cholesky(stat).float()


class A2ATSBlock(KVBlock):
    """Hot: ``codes [B, H, L]``, ``codebook [B, H, C, D]`` (pre-RoPE), the sinks exactly; cold: post-RoPE keys and
    values, one token per page ``[B, H, L, 1, D]``."""

    def __init__(self, *, codes, codebook, sink_keys, sink_values, counts, offset, store: ColdStore, lengths,
                 tokens_per_step: int, inv_freq, rope_scaling: float, distance: int, columns: int,
                 dim: int):  # fmt: skip
        self.codes, self.codebook, self.sink_keys, self.sink_values = codes, codebook, sink_keys, sink_values
        self.counts, self.offset, self.store, self.lengths = counts, offset, store, lengths.cpu()
        self.tokens_per_step, self.inv_freq, self.rope_scaling = tokens_per_step, inv_freq, rope_scaling
        self.distance, self.columns, self.dim = distance, columns, dim  # columns: the context's, at encoding

    @property
    def sinks(self) -> int:
        return self.sink_keys.shape[2]

    def present(self) -> torch.Tensor:
        """Which slots ``[B, H, L]`` hold a token."""
        return torch.arange(self.codes.shape[-1], device=self.codes.device)[None, None, :] < self.counts[..., None]

    def approx_scores(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Approximate ``q·k`` of post-RoPE queries ``q [B, H, M, D]`` at ``positions [B, 1|H, M]`` with every slot
        ``[B, H, M, L]`` (float32): ``R(distance - m) q`` times the codeword of each token (times the RoPE scaling)."""
        qw = rotate(q, self.distance - positions, self.inv_freq) * self.rope_scaling
        table = qw @ self.codebook.float().transpose(-1, -2)  # [B, H, M, C]
        B, H, M, _ = table.shape
        return table.gather(-1, self.codes.long()[:, :, None, :].expand(B, H, M, -1))

    def query_positions(self, n: int, first_col: int, M: int, device) -> torch.Tensor:
        """Positions ``[B, 1, n]`` of grouped queries (``n = groups × M``, group-major) whose first is at column
        ``first_col``."""
        j = torch.arange(n, device=device) % M
        return self.offset.to(device)[:, None, None] + first_col + j[None, None, :]

    def select(self, q: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens fetched for ``q``: top-K slots ``[B, H, K]`` of the largest approximate score over the head's
        queries (sinks and empty slots excluded) and whether each is a real token."""
        score = self.approx_scores(q, positions).amax(2)
        slot = torch.arange(score.shape[-1], device=score.device)[None, None, :]
        score = score.masked_fill(~self.present() | (slot < self.sinks), float("-inf"))
        return top_pages(score, self.tokens_per_step)

    def attend_at(self, q: torch.Tensor, scaling: float, first_col: int, M: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`attend` of grouped queries whose first token is at column ``first_col`` (``M`` query tokens)."""
        index, ok = self.select(q, self.query_positions(q.shape[2], first_col, M, q.device))
        keys = self.store.take("k", index).flatten(2, 3).to(q.dtype)  # [B, H, K, D]
        values = self.store.take("v", index).flatten(2, 3).to(q.dtype)
        sink_ok = self.present()[..., : self.sinks]
        keys = torch.cat([self.sink_keys.to(q.dtype), keys], dim=2)
        values = torch.cat([self.sink_values.to(q.dtype), values], dim=2)
        mask = torch.cat([sink_ok, ok], dim=-1)[:, :, None, :]
        return partial_attention(q, keys, values, scaling, mask)

    def attend(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries taken to be at the column right after the encoded context (the layer calls :meth:`attend_at`)."""
        return self.attend_at(q, scaling, self.columns, q.shape[2])

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        counts = self.present().to(torch.int32)
        keys, values = unpaginate(self.store.full("k"), counts), unpaginate(self.store.full("v"), counts)
        return keys.to(dtype), values.to(dtype)


@register
class A2ATSCodec(RetrievalCodec):
    name = "a2ats"
    paper = "A²ATS: Retrieval-Based KV Cache Reduction via Windowed Rotary Position Embedding and Query-Aware Vector Quantization"  # noqa: E501
    arxiv = "2502.12665"

    residual: int = 32
    codebook: int = 128
    iters: int = 8
    distance: int = 512
    sinks: int = 4
    fixed_window = True

    def check(self) -> None:
        super().check()
        if not 1 <= self.codebook <= 32767 or self.iters < 0 or self.distance < 0 or self.sinks < 0:
            raise KVSqueezeError("a2ats: codebook must be in 1..32767, iters, distance and sinks >= 0")

    def attach(self, host, model) -> None:
        text = model.config.get_text_config()
        if any(kind != "full_attention" for kind in getattr(text, "layer_types", None) or ()):
            raise KVSqueezeError("a2ats needs full-attention layers only (the model has sliding windows); use quest")
        inv, scale = rope_params(model, who="a2ats", fix="use quest")
        head_dim = head_dim_of(text)
        if 2 * len(inv) != head_dim:
            raise KVSqueezeError("a2ats needs RoPE over the whole head (this model rotates part of it); use quest")
        host.shared_state[ROPE] = (inv, scale)

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        if ctx is None:
            raise KVSqueezeError("a2ats keeps decoded tokens in its hot window; drop group=")
        rope = ctx.shared.get(ROPE)
        if rope is None:
            raise KVSqueezeError("a2ats needs the model's RoPE: build the cache with CompressedCache(model, ...)")
        device, D, Dv = keys.device, keys.shape[-1], values.shape[-1]
        inv_freq = torch.tensor(rope[0], dtype=torch.float32, device=device)
        B, H, L = ctx.stored.shape
        full_pos = ctx.positions if ctx.positions is not None else (ctx.valid.long().cumsum(-1) - 1).clamp(min=0)
        full_pos = full_pos.to(device)
        pos = full_pos[:, None, :].expand(B, H, L)[ctx.stored.to(device)].to(torch.int32)
        pre = unrope(keys, pos, inv_freq.double(), rope[1])
        kp, counts = paginate(keys, lengths, 1)  # [B, H, S, 1, D], one token per page
        vp, _ = paginate(values, lengths, 1)
        prep = paginate(pre, lengths, 1)[0][:, :, :, 0]  # [B, H, S, D]
        S = kp.shape[2]
        present = counts.bool()

        # query-aware codebook: k-means of the whitened pre-RoPE keys, mapped back
        chol = query_cholesky(ctx, H, D, full_pos, inv_freq, self.distance, device)  # [B, H, D, D]
        white = prep.float() @ chol
        C = self.codebook
        centroids, labels, _ = kmeans(white.flatten(0, 1), present.flatten(0, 1), C, self.iters)
        codebook = torch.linalg.solve_triangular(chol, centroids.view(B, H, C, D), upper=False, left=False)
        codes = labels.view(B, H, S).to(torch.uint8 if C <= 256 else torch.int16)

        n_sink = min(self.sinks, S)
        e = keys.element_size()
        unit = (D + Dv) * e  # bytes of one full-cache token per head
        hot = S * codes.element_size() + C * D * e + 8
        overhead = hot / unit + n_sink + self.residual
        fetch = self.fetch_tokens(ctx, overhead, 1, "the codes, the codebook, the sinks and the window")
        k = S if fetch is None else max(min(fetch, S), 1)
        offset = (full_pos[:, -1] - (L - 1)).to(torch.int32)  # RoPE position minus column, per row
        store = self.store_for(device)
        store.put("k", kp)
        store.put("v", vp)
        return A2ATSBlock(
            codes=codes.contiguous(), codebook=codebook.to(keys.dtype).contiguous(),
            sink_keys=kp[:, :, :n_sink, 0].contiguous(), sink_values=vp[:, :, :n_sink, 0].contiguous(),
            counts=counts.sum(-1).to(torch.int32), offset=offset, store=store, lengths=lengths,
            tokens_per_step=k, inv_freq=inv_freq, rope_scaling=rope[1], distance=self.distance, columns=L,
            dim=D,
        )  # fmt: skip
