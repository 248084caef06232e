"""``icecache``: tokens clustered by their keys into contiguous pages, a cluster index (centroids → pages) kept hot;
per decoding step the best clusters' pages are fetched from the cold tier; decoded tokens update the index.

Paper: "IceCache: Memory-efficient KV-cache Management for Long-Sequence LLMs", Mao et al., arXiv 2604.10539.

- *Semantic pages*: the stored (post-RoPE) keys of every (row, KV head) are clustered by k-means (batched over rows
  and heads, :mod:`kvsqueeze.retrieval.kmeans`; ``clusters`` per head, default one per 32 tokens); each cluster's
  tokens, in their original order, fill consecutive pages of ``page`` tokens, so a page holds one cluster's tokens
  only. Keys and values go to the cold tier (:class:`~kvsqueeze.core.tiers.ColdStore`, ``tier=ram|disk``).
- *Hierarchical index* (hot): the cluster centroids and sizes, and per page its cluster and token count.
- Per decoding step a cluster's score is ``q·centroid`` (largest over the head's queries); pages take their cluster's
  score and the best ``k`` pages are fetched (whole clusters in order of score, the last one possibly in part) and
  attended with the recent window (the cache's full-precision tail, ``residual`` tokens).
- *Updates*: every ``group`` decoded tokens beyond the window are flushed: each joins the cluster of its nearest
  centroid, the centroids move to the new means, and the tokens are packed by cluster into new pages appended to the
  cold tier (a fixed page count per flush, so no host synchronisation decides shapes).
- Hot budget: ``ratio``/``budget`` give each head's hot tokens; the centroids, sizes, page table and the recent window
  are charged first, the rest is fetched per step in whole pages (``fetch=`` overrides; ``k`` stays fixed as pages
  are added).

Deviations: the paper's index is a multi-level Dynamic Continuous Indexing (M-DCI) tree searched by approximate
nearest neighbours; here it is one level of k-means clusters (``iters`` Lloyd iterations from evenly spaced tokens)
over pages, searched exactly. The paper offloads to CPU with preloading buffers and CUDA kernels; here the pages are
gathered with PyTorch from the cold store. Grouped-query attention scores clusters per KV head by the largest score
over the head's query heads. An update rewrites the cold store with the appended pages (the old store stays with
forks). ``materialize`` returns a head's tokens grouped by cluster (attention does not depend on the order). Models
with sliding-window layers are refused.
"""

from __future__ import annotations

import math

import torch

from kvsqueeze.core.attention_math import partial_attention
from kvsqueeze.core.storage import DenseBlock, KVBlock
from kvsqueeze.core.tiers import ColdStore, FetchMeter, metered, paginate, unpaginate
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.retrieval.base import RetrievalCodec, top_pages
from kvsqueeze.retrieval.kmeans import kmeans, nearest
from kvsqueeze.spec import register


def pack(keys, values, labels, lengths, clusters: int, page: int, pages: int | None = None):
    """Tokens of flat ``keys/values [N, D]`` ((row, head, token) order, ``lengths [B, H]`` on the CPU) with cluster
    ``labels [N]`` packed by cluster into pages: ``(key pages [B, H, P, page, D], value pages, counts [B, H, P],
    page cluster [B, H, P] (-1: empty page))``. Within a cluster tokens keep their order. ``pages``: P when the
    caller knows a bound (no host read); None: the exact count (read once)."""
    B, H = lengths.shape
    device = keys.device
    C = clusters
    seg = torch.repeat_interleave(torch.arange(B * H), lengths.flatten()).to(device)
    group = seg * C + labels.long()
    order = torch.argsort(group, stable=True)
    group_sorted = group[order]
    size = torch.zeros(B * H * C, dtype=torch.long, device=device).index_add_(0, group, torch.ones_like(group))
    start = torch.cumsum(size, 0) - size  # first sorted slot of every (segment, cluster)
    rank = torch.arange(group.shape[0], device=device) - start[group_sorted]
    per = (size + page - 1) // page  # pages of every (segment, cluster)
    per_seg = per.view(B * H, C)
    first_page = (torch.cumsum(per_seg, -1) - per_seg).flatten()
    P = int(per_seg.sum(-1).max()) if pages is None else pages
    P = max(P, 1)
    slot_page = first_page[group_sorted] + rank // page
    slot = rank % page
    seg_sorted = group_sorted // C
    D, Dv = keys.shape[-1], values.shape[-1]
    kp = keys.new_zeros(B * H, P, page, D)
    vp = values.new_zeros(B * H, P, page, Dv)
    kp[seg_sorted, slot_page, slot] = keys[order]
    vp[seg_sorted, slot_page, slot] = values[order]
    counts = torch.zeros(B * H * P, dtype=torch.int32, device=device)
    counts.index_add_(0, seg_sorted * P + slot_page, torch.ones_like(slot_page, dtype=torch.int32))
    owner = torch.full((B * H * P,), -1, dtype=torch.int32, device=device)
    owner.scatter_(0, seg_sorted * P + slot_page, (group_sorted % C).to(torch.int32))
    shape = (B, H, P)
    return kp.view(*shape, page, D), vp.view(*shape, page, Dv), counts.view(shape), owner.view(shape)


class IceCacheBlock(KVBlock):
    """Hot: ``centroids [B, H, C, D]``, ``sizes [B, H, C]``, per page ``counts`` and ``owner`` (its cluster)
    ``[B, H, P]``; cold: keys/values pages ``[B, H, P, page, D]``."""

    def __init__(self, centroids, sizes, counts, owner, store: ColdStore, lengths, pages_per_step: int, dim: int):
        self.centroids, self.sizes, self.counts, self.owner, self.store = centroids, sizes, counts, owner, store
        self.lengths, self.pages_per_step, self.dim = lengths.cpu(), pages_per_step, dim  # 0: every page

    @property
    def page(self) -> int:
        return self.store.arrays["k"].shape[3] if "k" in self.store.arrays else self.store.maps["k"][2][3]

    def cluster_scores(self, q: torch.Tensor) -> torch.Tensor:
        """``q·centroid`` of every cluster ``[B, H, C]`` (largest over the grouped queries ``q [B, H, M, D]``; -inf
        for empty clusters)."""
        s = (q.float() @ self.centroids.float().transpose(-1, -2)).amax(2)
        return s.masked_fill(self.sizes <= 0, float("-inf"))

    def select(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages fetched for ``q``: the top-k pages by their cluster's score ``[B, H, k]`` and whether each is real."""
        score = self.cluster_scores(q).gather(-1, self.owner.clamp(min=0).long())
        score = score.masked_fill((self.owner < 0) | (self.counts == 0), float("-inf"))
        return top_pages(score, self.pages_per_step or score.shape[-1])

    def attend(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        index, ok = self.select(q)
        keys, values = self.store.take("k", index), self.store.take("v", index)  # [B, H, k, page, D]
        counts = self.counts.gather(-1, index)
        page = keys.shape[3]
        present = (torch.arange(page, device=q.device)[None, None, None, :] < counts[..., None]) & ok[..., None]
        mask = present.flatten(2)[:, :, None, :]
        return partial_attention(q, keys.flatten(2, 3).to(q.dtype), values.flatten(2, 3).to(q.dtype), scaling, mask)

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token, grouped by cluster within each (row, head)."""
        counts = self.counts.to(self.centroids.device)
        return unpaginate(self.store.full("k"), counts).to(dtype), unpaginate(self.store.full("v"), counts).to(dtype)

    def updated(self, keys: torch.Tensor, values: torch.Tensor) -> IceCacheBlock:
        """A new block with decoded tokens ``keys/values [B, H, g, D]`` inserted: each joins its nearest cluster,
        centroids move to the new means, the tokens are packed into ``ceil(g/page) + min(C, g)`` new pages."""
        B, H, g, D = keys.shape
        C = self.centroids.shape[2]
        x = keys.float().reshape(B * H, g, D)
        cents = self.centroids.float().reshape(B * H, C, D)
        labels = nearest(x, (x * x).sum(-1, keepdim=True), cents)  # [BH, g]
        flat = (labels + torch.arange(B * H, device=keys.device)[:, None] * C).flatten()
        added = torch.zeros(B * H * C, device=keys.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
        sums = torch.zeros(B * H * C, D, device=keys.device).index_add_(0, flat, x.flatten(0, 1))
        sizes = self.sizes.float().reshape(-1)
        new_sizes = sizes + added
        cents_flat = cents.reshape(-1, D)
        moved = (cents_flat * sizes[:, None] + sums) / new_sizes.clamp(min=1e-12)[:, None]
        cents_flat = torch.where(added[:, None] > 0, moved, cents_flat)
        extra = math.ceil(g / self.page) + min(C, g)
        lengths = torch.full((B, H), g, dtype=torch.long)
        kp, vp, counts, owner = pack(
            keys.reshape(-1, D), values.reshape(-1, values.shape[-1]), labels.flatten(), lengths, C, self.page, extra
        )
        with metered(FetchMeter()):  # rewriting the cold tier is not a fetch of a decoding step
            old_k, old_v = self.store.full("k"), self.store.full("v")
        store = ColdStore(self.store.backend, self.store.directory, self.store.hot_device)
        store.put("k", torch.cat([old_k, kp.to(old_k.device, old_k.dtype)], dim=2))
        store.put("v", torch.cat([old_v, vp.to(old_v.device, old_v.dtype)], dim=2))
        return IceCacheBlock(
            cents_flat.view(B, H, C, D).to(self.centroids.dtype), new_sizes.view(B, H, C).to(self.sizes.dtype),
            torch.cat([self.counts, counts], -1), torch.cat([self.owner, owner], -1), store,
            self.lengths + lengths, self.pages_per_step, self.dim,
        )  # fmt: skip


@register
class IceCacheCodec(RetrievalCodec):
    name = "icecache"
    paper = "IceCache: Memory-efficient KV-cache Management for Long-Sequence LLMs"
    arxiv = "2604.10539"

    group: int = 64
    page: int = 8
    clusters: int = 0  # 0: one per 32 tokens of the longest head
    iters: int = 8

    def check(self) -> None:
        super().check()
        if self.clusters < 0 or self.iters < 0:
            raise KVSqueezeError("icecache: clusters and iters must be >= 0")

    def attach(self, host, model) -> None:
        text = model.config.get_text_config()
        if any(kind != "full_attention" for kind in getattr(text, "layer_types", None) or ()):
            raise KVSqueezeError("icecache needs full-attention layers only (the model has sliding windows); use quest")

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        if ctx is None:  # decoded tokens flushed from the window: :meth:`extend` inserts them into the index
            return DenseBlock(keys, values, lengths)
        device, D, Dv = keys.device, keys.shape[-1], values.shape[-1]
        padded, counts1 = paginate(keys, lengths, 1)  # [B, H, S, 1, D]
        B, H, S = counts1.shape
        present = counts1.bool()
        C = self.clusters or max(math.ceil(int(lengths.max()) / 32), 1)
        centroids, labels, sizes = kmeans(padded[:, :, :, 0].flatten(0, 1), present.flatten(0, 1), C, self.iters)
        labels = labels.view(B, H, S)[present]  # flat, in the (row, head, token) order of ``keys``
        kp, vp, counts, owner = pack(keys, values, labels, lengths, C, self.page)
        P = counts.shape[-1]
        e = keys.element_size()
        unit = (D + Dv) * e  # bytes of one full-cache token per head
        overhead = (C * (D * e + 4) + P * 8) / unit + self.residual
        fetch = self.fetch_tokens(ctx, overhead, self.page, "the cluster index and the window")
        k = 0 if fetch is None else max(min(fetch // self.page, P), 1)
        store = self.store_for(device)
        store.put("k", kp)
        store.put("v", vp)
        return IceCacheBlock(
            centroids.view(B, H, C, D).to(keys.dtype), sizes.view(B, H, C), counts, owner, store, lengths, k, D
        )

    def extend(self, block: KVBlock, newer: KVBlock) -> KVBlock | None:
        if not isinstance(block, IceCacheBlock) or not isinstance(newer, DenseBlock) or not newer.uniform:
            return None
        B, H = newer.lengths.shape
        g = newer.host.width
        return block.updated(newer.keys.view(B, H, g, -1), newer.values.view(B, H, g, -1))
