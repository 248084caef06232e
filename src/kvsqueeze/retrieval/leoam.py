"""``leoam``: variable-size chunks from the skew of each layer's attention, per-chunk key abstracts kept hot, the
chunks that matter fetched token-exactly from RAM or disk, the most attended ones cached in RAM in front of disk.

Paper: "Breaking the Boundaries of Long-Context LLM Inference: Adaptive KV Management on a Single Commodity GPU",
Sun et al., arXiv 2506.20187 (LeoAM).

- *Adaptive chunks* (the paper's importance-aware adaptive KV management): the attention of the prefill's last
  ``window`` queries (pooled over each KV head's query heads) is skewed, with long runs of tokens that receive almost
  nothing ("attention deserts"). Tokens are cut into chunks of ``mass`` attention each (a new chunk starts where the
  running attention mass crosses a multiple of ``mass``; a token holding ``mass`` alone is its own chunk) and at most
  ``chunk`` tokens: deserts become long chunks, attended regions short ones, so each layer and head gets its own
  chunk sizes from its own skew.
- *Chunk abstracts* (the paper's lightweight KV abstract), kept hot where the importance check runs: the per-channel
  minimum and maximum of the chunk's keys (at the model's dtype) and its start and length; per decoding step the
  upper bound ``relu(q)·max + min(q, 0)·min`` (largest over the head's queries) ranks the chunks and the best ones
  are taken, in order, while they fit in ``T`` tokens; exactly those tokens are fetched (``T`` gathered slots, no
  page padding) and attended with the recent window (the cache's tail, ``residual`` tokens).
- *Tiers*: keys and values one token per page in the cold tier (:class:`~kvsqueeze.core.tiers.ColdStore`,
  ``tier=ram|disk``); with ``tier=disk``, ``warm`` is the fraction of tokens, those of the chunks with the most
  prefill attention, also kept in a RAM tier in front of the disk (GPU–CPU–disk): a fetch reads those from RAM and
  only the rest from disk (the split is decided on the host, where the disk read happens anyway).
- Hot budget: ``ratio``/``budget`` give each head's hot tokens; the abstracts (one token's worth per chunk plus eight
  bytes) and the window are charged first, ``T`` is the rest (``fetch=`` overrides) and must hold a whole chunk.

Deviations: the paper re-evaluates the chunking as decoding proceeds and across decoding steps, compresses what it
moves (dynamic compression) and overlaps the three tiers in a pipeline; here the chunks are fixed at the prefill,
nothing is compressed and reads are synchronous. The abstract here is Quest-style min/max (the paper's abstract is
also what it stores on disk instead of the full chunk). The RAM tier is chosen once from the prefill's attention (no
LRU). Grouped-query attention ranks chunks per KV head by the largest bound over the head's query heads. Tokens
decoded after the prefill stay in the hot window. No custom kernels.
"""

from __future__ import annotations

import torch

from kvsqueeze.core.attention_math import partial_attention
from kvsqueeze.core.storage import KVBlock
from kvsqueeze.core.tiers import ColdStore, paginate, record_fetch, unpaginate
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.retrieval.base import RetrievalCodec
from kvsqueeze.spec import register


def chunk_ids(mass: torch.Tensor, present: torch.Tensor, per_chunk: float, longest: int) -> torch.Tensor:
    """Chunk of every token ``[B, H, S]`` (-1: no token) from its attention ``mass [B, H, S]`` (sums to 1 per head):
    a chunk ends where the running mass crosses a multiple of ``per_chunk`` or after ``longest`` tokens; a token of
    mass ``per_chunk`` or more is a chunk alone."""
    S = mass.shape[-1]
    before = torch.cumsum(mass, -1) - mass
    band = torch.floor(before / per_chunk)
    idx = torch.arange(S, device=mass.device)
    shifted = torch.cat([torch.full_like(band[..., :1], -1.0), band[..., :-1]], -1)
    heavy = mass >= per_chunk  # a token that alone holds a chunk's mass is a chunk of its own
    heavy_before = torch.cat([torch.zeros_like(heavy[..., :1]), heavy[..., :-1]], -1)
    first = present & ((band != shifted) | heavy | heavy_before)
    run_start = torch.where(first, idx, torch.zeros_like(idx)).cummax(-1).values
    boundary = present & (first | ((idx - run_start) % longest == 0))
    cid = torch.cumsum(boundary.long(), -1) - 1
    return torch.where(present, cid, torch.full_like(cid, -1))


class LeoAMBlock(KVBlock):
    """Hot: per chunk ``kmin/kmax [B, H, P, D]``, ``start``, ``length [B, H, P]``; cold: keys/values one token per
    page ``[B, H, S, 1, D]``, optionally a RAM tier (``warm``: arrays ``k``, ``v`` ``[B, H, W, 1, D]`` and ``slot``
    ``[B, H, S, 1, 1]``, a token's RAM slot or -1) in front of a disk store."""

    def __init__(self, kmin, kmax, start, length, store: ColdStore, warm: ColdStore | None, lengths,
                 tokens_per_step: int, dim: int):  # fmt: skip
        self.kmin, self.kmax, self.start, self.length = kmin, kmax, start, length
        self.store, self.warm, self.lengths = store, warm, lengths.cpu()
        self.tokens_per_step, self.dim = tokens_per_step, dim

    def bounds(self, q: torch.Tensor) -> torch.Tensor:
        """Upper bound of ``q·k`` over every chunk ``[B, H, P]`` (largest over the grouped queries; -inf: empty)."""
        qf = q.float()
        high, low = self.kmax.float().transpose(-1, -2), self.kmin.float().transpose(-1, -2)
        b = qf.clamp(min=0) @ high + qf.clamp(max=0) @ low
        return b.amax(2).masked_fill(self.length == 0, float("-inf"))

    def select(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens fetched ``[B, H, T]`` (stored slots), whether each slot is used, and the chunks taken ``[B, H, P]``
        (ranked by bound, taken in order while they fit in ``T``)."""
        score = self.bounds(q)
        B, H, P = score.shape
        T = self.tokens_per_step
        values, order = torch.sort(score, dim=-1, descending=True)
        lens = self.length.gather(-1, order).long()
        total = torch.cumsum(lens, -1)
        taken = ((total <= T) & torch.isfinite(values)).long().cumprod(-1).bool()  # a prefix of the ranking
        used_tokens = (lens * taken).sum(-1, keepdim=True)
        j = torch.arange(T, device=q.device).expand(B, H, T).contiguous()
        rank = torch.searchsorted(total, j, right=True).clamp(max=P - 1)
        offset = j - (total.gather(-1, rank) - lens.gather(-1, rank))
        token = self.start.gather(-1, order.gather(-1, rank)).long() + offset
        used = j < used_tokens
        chunks = torch.zeros_like(taken).scatter(-1, order, taken)
        return torch.where(used, token, torch.zeros_like(token)), used, chunks

    def fetch(self, index: torch.Tensor, name: str) -> torch.Tensor:
        """Tokens ``index [B, H, T]`` of array ``name``: ``[B, H, T, D]`` on ``index``'s device, from the RAM tier
        where it holds them and the cold store for the rest."""
        if self.warm is None:
            return self.store.take(name, index)[:, :, :, 0]
        idx = index.to("cpu", torch.long)
        B, H, _ = idx.shape
        rows, heads = torch.arange(B)[:, None, None], torch.arange(H)[None, :, None]
        slot = self.warm.arrays["slot"][rows, heads, idx, 0, 0].long()
        hit = slot >= 0
        out = self.warm.arrays[name][rows, heads, slot.clamp(min=0), 0].clone()  # [B, H, T, D]
        record_fetch(int(hit.sum()) * out.shape[-1] * out.element_size())
        b, h, t = (~hit).numpy().nonzero()
        if len(b):
            cold = self.store.take_points(name, b, h, idx.numpy()[b, h, t])[:, 0]
            out[torch.from_numpy(b), torch.from_numpy(h), torch.from_numpy(t)] = cold.to(out.dtype)
        return out.to(index.device, non_blocking=True)

    def attend(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        index, used, _ = self.select(q)
        keys, values = self.fetch(index, "k").to(q.dtype), self.fetch(index, "v").to(q.dtype)
        return partial_attention(q, keys, values, scaling, used[:, :, None, :])

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        S = self.store.arrays["k"].shape[2] if "k" in self.store.arrays else self.store.maps["k"][2][2]
        present = (torch.arange(S, device=self.kmin.device)[None, None, :] < self.length.sum(-1, keepdim=True)).int()
        return tuple(unpaginate(self.store.full(n), present).to(dtype) for n in ("k", "v"))


@register
class LeoAMCodec(RetrievalCodec):
    name = "leoam"
    paper = "Breaking the Boundaries of Long-Context LLM Inference: Adaptive KV Management on a Single Commodity GPU"
    arxiv = "2506.20187"

    mass: float = 0.02
    chunk: int = 32
    window: int = 32
    warm: float = 0.0
    fixed_window = True

    def check(self) -> None:
        super().check()
        if not 0.0 < self.mass <= 1.0 or self.chunk < 1 or self.window < 1 or not 0.0 <= self.warm <= 1.0:
            raise KVSqueezeError("leoam: mass must be in (0, 1], chunk and window >= 1, warm in [0, 1]")
        if self.warm and self.tier != "disk":
            raise KVSqueezeError("leoam: warm= caches chunks in RAM in front of a disk tier; add tier=disk")

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        if ctx is None:
            raise KVSqueezeError("leoam keeps decoded tokens in its hot window; drop group=")
        device, D, Dv = keys.device, keys.shape[-1], values.shape[-1]
        kp, counts = paginate(keys, lengths, 1)  # [B, H, S, 1, D]: one token per page
        vp, _ = paginate(values, lengths, 1)
        present = counts.bool()
        B, H, S = present.shape
        if ctx.queries is not None and ctx.queries.shape[2]:
            att = ctx.per_kv_head(ctx.window_attention(self.window).sum(2)) * ctx.groups  # [B, H, L]
            att = paginate(att.to(device)[ctx.stored.to(device)][:, None], lengths, 1)[0][..., 0, 0]
        else:
            att = present.float()
        att = att.float() * present
        att = att / att.sum(-1, keepdim=True).clamp(min=1e-30)
        cid = chunk_ids(att, present, self.mass, self.chunk)
        P = max(int(cid.max()) + 1, 1)
        slot = torch.where(present, cid, torch.full_like(cid, P))  # absent tokens go to a dropped chunk P
        length = torch.zeros(B, H, P + 1, dtype=torch.int32, device=device).scatter_add_(
            -1, slot, present.to(torch.int32)
        )[..., :P]
        idx = torch.arange(S, device=device).expand(B, H, S)
        start = torch.full((B, H, P + 1), S, dtype=torch.long, device=device).scatter_reduce(
            -1, slot, idx, "amin", include_self=True
        )[..., :P]
        flat = kp[:, :, :, 0].float()
        where = slot[..., None].expand(B, H, S, D)
        kmax = torch.full((B, H, P + 1, D), float("-inf"), device=device).scatter_reduce(
            2, where, flat.masked_fill(~present[..., None], float("-inf")), "amax", include_self=True
        )[:, :, :P]
        kmin = torch.full((B, H, P + 1, D), float("inf"), device=device).scatter_reduce(
            2, where, flat.masked_fill(~present[..., None], float("inf")), "amin", include_self=True
        )[:, :, :P]
        empty = (length == 0)[..., None]
        kmax, kmin = kmax.masked_fill(empty, 0).to(keys.dtype), kmin.masked_fill(empty, 0).to(keys.dtype)

        e = keys.element_size()
        unit = (D + Dv) * e  # bytes of one full-cache token per head
        overhead = P * (2 * D * e + 8) / unit + self.residual
        fetch = self.fetch_tokens(ctx, overhead, self.chunk, "the chunk abstracts and the window")
        T = S if fetch is None else max(min(fetch, S), 1)
        if min(self.chunk, S) > T:
            raise KVSqueezeError(f"leoam: fetch={T} tokens cannot hold one {self.chunk}-token chunk; use chunk<={T}")
        store = self.store_for(device)
        store.put("k", kp)
        store.put("v", vp)
        warm = self.warm_tier(kp, vp, att, cid, present) if self.warm else None
        return LeoAMBlock(kmin.contiguous(), kmax.contiguous(), start.to(torch.int32), length, store, warm,
                          lengths, T, D)  # fmt: skip

    def warm_tier(self, kp, vp, att, cid, present) -> ColdStore:
        """A RAM store of the tokens of the chunks with the most prefill attention (``warm`` of each head's tokens)."""
        B, H, _ = present.shape
        P = int(cid.max()) + 1
        slot = torch.where(present, cid, torch.full_like(cid, P))
        chunk_mass = torch.zeros(B, H, P + 1, device=att.device).scatter_add_(-1, slot, att)[..., :P]
        chunk_len = torch.zeros(B, H, P + 1, device=att.device).scatter_add_(-1, slot, present.float())[..., :P]
        order = torch.argsort(chunk_mass, -1, descending=True)
        within = torch.cumsum(chunk_len.gather(-1, order), -1) <= self.warm * present.sum(-1, keepdim=True)
        chosen = torch.zeros(B, H, P + 1, dtype=torch.bool, device=att.device)
        chosen[..., :P] = torch.zeros_like(within).scatter(-1, order, within)
        is_warm = chosen.gather(-1, slot) & present
        ram_slot = torch.where(is_warm, torch.cumsum(is_warm.long(), -1) - 1, torch.full_like(cid, -1))
        W = max(int(is_warm.sum(-1).max()), 1)
        b, h, s = is_warm.nonzero(as_tuple=True)
        ram_k = kp.new_zeros(B, H, W, 1, kp.shape[-1])
        ram_v = vp.new_zeros(B, H, W, 1, vp.shape[-1])
        ram_k[b, h, ram_slot[b, h, s]] = kp[b, h, s]
        ram_v[b, h, ram_slot[b, h, s]] = vp[b, h, s]
        ram = ColdStore("ram", None, kp.device)
        ram.put("k", ram_k)
        ram.put("v", ram_v)
        ram.put("slot", ram_slot.to(torch.int32)[..., None, None])
        return ram
