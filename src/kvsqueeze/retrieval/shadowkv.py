"""``shadowkv``: low-rank pre-RoPE keys and chunk landmarks hot, values cold, keys rebuilt for the chunks each
step needs.

Paper: "ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM Inference", Sun et al.,
arXiv 2410.21465.

- The stored (post-RoPE) keys are rotated back to pre-RoPE with their positions (:mod:`kvsqueeze.core.rope`) and
  factored by a truncated SVD, ``K_pre ≈ A B`` (``A [L, rank]``, ``B [rank, D]``), kept hot at the model's dtype.
  Values go to the cold tier (:class:`~kvsqueeze.core.tiers.ColdStore`, ``tier=ram|disk``).
- Tokens are cut into chunks of ``chunk``; each chunk's landmark (the mean of its post-RoPE keys) is kept hot.
  The ``outliers`` fraction of chunks whose keys are least similar to their landmark (lowest mean cosine
  similarity) is kept hot exactly (post-RoPE keys and values) and always attended.
- Per decoding step the landmarks score the chunks (``q·landmark``), the top chunks are selected, their keys
  rebuilt from ``A B`` and re-rotated to their positions, their values fetched from cold; they are attended with
  the outliers and the recent window (``residual`` tokens in the cache's full-precision tail).
- Hot budget: ``ratio``/``budget`` give each head's hot tokens; the factors, landmarks, positions (int32),
  outliers and window are charged first, the rest is fetched per step in whole chunks (``fetch=`` overrides).

Deviations: the SVD is per (row, KV head) over that head's keys (``rank <= head_dim``; default ``head_dim // 6``,
the paper's 160 of 1024 channels), not one SVD over all heads' channels of a layer, so heads may keep different
tokens (``snapkv+shadowkv``). The paper's 48 outlier chunks are a fraction here (``outliers=0.015`` of the chunks).
Grouped-query attention scores chunks per KV head by the largest ``q·landmark`` over the head's query heads (the
paper averages the group's scores). Tokens decoded after the prefill stay in the hot window. Full-attention RoPE
models only. No custom kernels or CUDA streams: rebuilt keys and fetched values are gathered with PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvsqueeze.core.attention_math import partial_attention
from kvsqueeze.core.rope import rope_params, rotate_half_pairs, unrope
from kvsqueeze.core.storage import KVBlock
from kvsqueeze.core.tiers import ColdStore, paginate, unpaginate
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.models import head_dim_of
from kvsqueeze.retrieval.base import RetrievalCodec, top_pages
from kvsqueeze.spec import register

ROPE = "shadowkv_rope"  # shared_state: (inverse frequencies, attention scaling) of the model's RoPE


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    """RoPE of pre-RoPE ``x [..., D]`` at ``positions [...]`` (float32 angles, as transformers computes them)."""
    ang = positions.float()[..., None] * inv_freq.float()
    return rotate_half_pairs(x, ang.cos() * scaling, ang.sin() * scaling)


class ShadowKVBlock(KVBlock):
    """Hot: ``A [B, H, C, chunk, r]``, ``B [B, H, r, D]``, landmarks ``[B, H, C, D]``, positions and counts, outlier
    chunks exactly; cold: values ``[B, H, C, chunk, Dv]``."""

    def __init__(self, *, left, right, landmarks, positions, counts, outlier, out_keys, out_values, out_present,
                 store: ColdStore, lengths, chunks_per_step: int, inv_freq, rope_scaling: float, dim: int):  # fmt: skip
        self.left, self.right, self.landmarks, self.pos, self.counts = left, right, landmarks, positions, counts
        self.outlier, self.out_keys, self.out_values, self.out_present = outlier, out_keys, out_values, out_present
        self.store, self.lengths, self.chunks_per_step = store, lengths.cpu(), chunks_per_step
        self.inv_freq, self.rope_scaling, self.dim = inv_freq, rope_scaling, dim

    @property
    def chunk(self) -> int:
        return self.left.shape[3]

    def rebuild(self, index: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys of chunks ``index [B, H, k]``: ``[B, H, k, chunk, D]`` float32 (``A B``, re-rotated)."""
        B, H, _ = index.shape
        rows = torch.arange(B, device=index.device)[:, None, None]
        heads = torch.arange(H, device=index.device)[None, :, None]
        pre = self.left[rows, heads, index].float() @ self.right.float()[:, :, None]  # [B, H, k, chunk, D]
        return rotate(pre, self.pos[rows, heads, index], self.inv_freq, self.rope_scaling)

    def select(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunks fetched for ``q [B, H, M, D]``: top-k of ``q·landmark`` (largest over the head's queries), outlier
        and empty chunks excluded; indices ``[B, H, k]`` and whether each is usable."""
        score = (q.float() @ self.landmarks.float().transpose(-1, -2)).amax(2)
        score = score.masked_fill((self.counts == 0) | self.outlier, float("-inf"))
        return top_pages(score, self.chunks_per_step)

    def attend(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        index, ok = self.select(q)
        keys = self.rebuild(index)
        values = self.store.take("v", index)
        counts = self.counts.gather(-1, index)
        present = (torch.arange(self.chunk, device=q.device)[None, None, None, :] < counts[..., None]) & ok[..., None]
        keys = torch.cat([keys.flatten(2, 3).to(q.dtype), self.out_keys.flatten(2, 3).to(q.dtype)], dim=2)
        values = torch.cat([values.flatten(2, 3).to(q.dtype), self.out_values.flatten(2, 3).to(q.dtype)], dim=2)
        mask = torch.cat([present.flatten(2), self.out_present.flatten(2)], dim=2)[:, :, None, :]
        return partial_attention(q, keys, values, scaling, mask)

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys as attention sees them (rebuilt from the factors, outlier chunks exact) and values."""
        B, H, C = self.counts.shape
        keys = self.rebuild(torch.arange(C, device=self.counts.device).expand(B, H, C).contiguous())
        outliers = self.outlier.nonzero(as_tuple=True)
        if outliers[0].numel():
            order = self.outlier.long().cumsum(-1) - 1  # rank of each outlier chunk among its head's outliers
            keys[outliers] = self.out_keys[outliers[0], outliers[1], order[outliers]].float()
        counts = self.counts
        return unpaginate(keys, counts).to(dtype), unpaginate(self.store.full("v"), counts).to(dtype)


@register
class ShadowKVCodec(RetrievalCodec):
    name = "shadowkv"
    paper = "ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM Inference"
    arxiv = "2410.21465"

    rank: int = 0  # 0: head_dim // 6
    chunk: int = 8
    outliers: float = 0.015
    fixed_window = True

    def check(self) -> None:
        super().check()
        if self.chunk < 1 or not 0.0 <= self.outliers < 1.0 or self.rank < 0:
            raise KVSqueezeError("shadowkv: chunk must be >= 1, outliers in [0, 1), rank >= 0")

    def attach(self, host, model) -> None:
        text = model.config.get_text_config()
        if any(kind != "full_attention" for kind in getattr(text, "layer_types", None) or ()):
            raise KVSqueezeError("shadowkv needs full-attention layers only (the model has sliding windows); use quest")
        inv, scale = rope_params(model, who="shadowkv", fix="use quest")
        head_dim = head_dim_of(text)
        if 2 * len(inv) != head_dim:
            raise KVSqueezeError("shadowkv needs RoPE over the whole head (this model rotates part of it); use quest")
        host.shared_state[ROPE] = (inv, scale)

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        if ctx is None:
            raise KVSqueezeError("shadowkv keeps decoded tokens in its hot window; drop group=")
        rope = ctx.shared.get(ROPE)
        if rope is None:
            raise KVSqueezeError("shadowkv needs the model's RoPE: build the cache with CompressedCache(model, ...)")
        device, D, Dv = keys.device, keys.shape[-1], values.shape[-1]
        inv_freq = torch.tensor(rope[0], dtype=torch.float32, device=device)
        B, H, L = ctx.stored.shape
        full_pos = ctx.positions if ctx.positions is not None else (ctx.valid.long().cumsum(-1) - 1).clamp(min=0)
        pos = full_pos.to(device)[:, None, :].expand(B, H, L)[ctx.stored].to(torch.int32)
        pre = unrope(keys, pos, inv_freq.double(), rope[1])
        c = self.chunk
        kp, counts = paginate(keys, lengths, c)  # [B, H, C, c, D]
        prep, _ = paginate(pre, lengths, c)
        vp, _ = paginate(values, lengths, c)
        posp = paginate(pos[:, None], lengths, c)[0][..., 0]  # [B, H, C, c]
        C = counts.shape[-1]
        present = torch.arange(c, device=device)[None, None, None, :] < counts[..., None]  # [B, H, C, c]

        # low-rank pre-RoPE keys (zero padding adds nothing to the factorisation)
        r = min(self.rank or max(D // 6, 1), D)
        u, s, vh = torch.linalg.svd(prep.flatten(2, 3).float(), full_matrices=False)
        left = (u[..., :r] * s[..., None, :r]).to(keys.dtype).view(B, H, C, c, r)
        right = vh[..., :r, :].to(keys.dtype)

        # landmarks and outlier chunks
        weight = present[..., None].float()
        landmarks = (kp.float() * weight).sum(3) / counts.clamp(min=1)[..., None]
        sim = F.cosine_similarity(kp.float(), landmarks[:, :, :, None], dim=-1)
        sim = (sim * present).sum(-1) / counts.clamp(min=1)
        n_out = min(round(self.outliers * C), C)
        sim = sim.masked_fill(counts == 0, float("inf"))
        out_index, out_ok = top_pages(-sim, n_out) if n_out else (counts.new_zeros(B, H, 0), present[..., 0, :0])
        out_index, order = out_index.sort(-1)  # in chunk order (materialize relies on it)
        out_ok = out_ok.gather(-1, order)
        outlier = torch.zeros(B, H, C, dtype=torch.bool, device=device)
        outlier.scatter_(-1, out_index, out_ok)
        rows = torch.arange(B, device=device)[:, None, None]
        heads = torch.arange(H, device=device)[None, :, None]
        out_keys, out_values = kp[rows, heads, out_index], vp[rows, heads, out_index]
        out_present = present[rows, heads, out_index] & out_ok[..., None]

        e = keys.element_size()
        unit = (D + Dv) * e  # bytes of one full-cache token per head
        hot = C * c * r * e + r * D * e + C * D * e + C * c * 4 + C * 9
        overhead = hot / unit + n_out * c + self.residual
        fetch = self.fetch_tokens(ctx, overhead, c, "the low-rank keys, landmarks, outliers and the window")
        chunks = C if fetch is None else max(min(fetch // c, C), 1)
        store = self.store_for(device)
        store.put("v", vp)
        return ShadowKVBlock(
            left=left.contiguous(), right=right.contiguous(), landmarks=landmarks.to(keys.dtype), positions=posp,
            counts=counts, outlier=outlier, out_keys=out_keys, out_values=out_values, out_present=out_present,
            store=store, lengths=lengths, chunks_per_step=chunks, inv_freq=inv_freq, rope_scaling=rope[1], dim=D,
        )  # fmt: skip
