"""``louiskv``: retrieval only at semantic boundaries, with clustered input tokens and segmented output tokens as the
retrieval units.

Paper: "LouisKV: Efficient KV Cache Retrieval for Long Input-Output Sequences", Wu, Si, Pan, Wang and Zhang,
arXiv 2510.11292.

- Input (the compressed prompt): per (row, KV head) the keys are clustered by spherical k-means (``cluster`` tokens
  per cluster on average, ``iters`` rounds, farthest-point seeds); each cluster's centroid (the mean of
  its post-RoPE keys, as cached) and size are kept hot with every token's cluster index; keys and values go to the
  cold tier (``tier=ram|disk``), one token per slot.
- Output (generated tokens): once the recent window (``residual``) overflows, the oldest ``group`` tokens leave it as
  one temporal segment whose mean key is kept hot and whose keys/values go cold (the first segments hold the
  prompt's last window, which stays hot at the prefill).
- Semantic boundaries: a step retrieves for a KV head only when the cosine similarity between its query (the mean
  of the head's grouped queries) and the query that triggered that head's last retrieval falls below
  ``threshold``; otherwise it reuses the retrieved set. A retrieval ranks the clusters by ``q · centroid`` (the
  largest over the head's queries) and takes their tokens in rank order up to the step's input budget, and the top
  ``out_segments`` output segments by ``q · mean``. The decision is a ``torch.where`` over the previous and the new
  candidate sets (both computed every step), so a decoding step never synchronises with the device; the retrieved
  index and the reference query live in the layer's state (a fork keeps its own), with a per-head retrieval count.
- Hot budget: ``ratio``/``budget`` give each head's hot tokens; centroids (one key each plus an int32 size), the
  per-token cluster index (int32), the reference query, the window and one output segment in the tail, the output
  segments fetched per step and the retrieved index (int64 per slot) are charged first, the rest is the input slots
  of a step (``fetch=`` overrides them).

Deviations: the first ``sinks`` tokens of every head (default 4: the attention sinks) are a cluster of their own,
retrieved first in every set. The retained set is re-gathered from the cold tier every step (a fixed-shape gather
keeps the step free of host synchronisation; the fetch meter counts it), so reuse saves the selection's change and,
on a device, what a transfer-skipping kernel would save, not metered bytes; the paper's custom Triton/CUDA kernels
and CPU-GPU pipelines are not reproduced. Retrieval is decided per KV head (the paper does not describe grouped-
query heads). The input budget is filled token by token in cluster rank order (the last cluster may be partial);
clusters come from k-means over the normalised keys with a fixed number of rounds. A new output segment refreshes
the output selection at its first step. Output segments are fixed-size (``group`` tokens), not cut at semantic
boundaries, and each new segment rewrites the output part of the cold tier (a copy of what was generated so far).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvsqueeze.core.attention_math import partial_attention
from kvsqueeze.core.storage import KVBlock
from kvsqueeze.core.tiers import ColdStore, paginate
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.retrieval.base import RetrievalCodec
from kvsqueeze.spec import register

STATE = "louiskv"  # CompressedLayer.state: the retrieved set of this stream (see attend_with_state)


def spherical_kmeans(x: torch.Tensor, present: torch.Tensor, clusters: int, iters: int) -> torch.Tensor:
    """Cluster index ``[B, H, P]`` of every token of ``x [B, H, P, D]`` (padding: ``present`` False, index
    ``clusters``) by k-means on the unit sphere, seeded by farthest points (from the first token)."""
    B, H, P, D = x.shape
    unit = F.normalize(x.float(), dim=-1) * present[..., None]
    # farthest-point seeding: each seed is the real token least similar to the seeds so far (one loop per seed)
    nearest = torch.full((B, H, P), -2.0, device=x.device).masked_fill(~present, 2.0)
    nearest[..., 0] = 2.0  # the first token is the first seed
    seeds = [unit[:, :, 0]]
    for _ in range(1, clusters):
        nearest = torch.maximum(nearest, (unit * seeds[-1][:, :, None]).sum(-1).masked_fill(~present, 2.0))
        pick = nearest.argmin(-1)  # [B, H]
        seeds.append(unit.gather(2, pick[..., None, None].expand(-1, -1, 1, D))[:, :, 0])
    centroids = torch.stack(seeds, dim=2)
    assign = torch.zeros(B, H, P, dtype=torch.long, device=x.device)
    for _ in range(max(iters, 1)):
        assign = (unit @ centroids.transpose(-1, -2)).argmax(-1)
        sums = torch.zeros_like(centroids).scatter_add_(2, assign[..., None].expand(-1, -1, -1, D), unit)
        sizes = torch.zeros(B, H, clusters, device=x.device).scatter_add_(2, assign, present.float())
        centroids = torch.where(sizes[..., None] > 0, F.normalize(sums, dim=-1), centroids)
    return assign.masked_fill(~present, clusters)


def group_means(x: torch.Tensor, assign: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``x [B, H, P, D]`` per index of ``assign [B, H, P]`` (``groups`` = padding, left out): means
    ``[B, H, groups, D]`` float32 and sizes ``[B, H, groups]`` int32."""
    B, H, _, D = x.shape
    real = assign < groups
    index = assign.clamp(max=groups - 1)
    sums = torch.zeros(B, H, groups, D, device=x.device).scatter_add_(
        2, index[..., None].expand(-1, -1, -1, D), x.float() * real[..., None]
    )
    sizes = torch.zeros(B, H, groups, dtype=torch.int32, device=x.device).scatter_add_(-1, index, real.int())
    return sums / sizes.clamp(min=1)[..., None], sizes


class LouisKVBlock(KVBlock):
    """Input part (hot ``centroids [B, H, C, D]``, ``sizes [B, H, C]``, ``assign [B, H, P]`` int32 with ``C`` =
    empty slot; cold keys/values ``[B, H, P, 1, D]``) and output part (hot ``means [B, H, S, D]``; cold keys/values
    ``[B, H, S, group, D]``); either may be absent."""

    def __init__(self, *, centroids, sizes, assign, store_in: ColdStore | None, in_slots: int, means,
                 store_out: ColdStore | None, out_segments: int, threshold: float, lengths, dim: int,
                 sink: int | None = None):  # fmt: skip
        self.centroids, self.sizes, self.assign, self.store_in, self.sink = centroids, sizes, assign, store_in, sink
        self.in_slots, self.means, self.store_out, self.out_segments = in_slots, means, store_out, out_segments
        self.threshold, self.lengths, self.dim = threshold, lengths.cpu(), dim

    @property
    def segments(self) -> int:
        return 0 if self.means is None else self.means.shape[2]

    # ---- candidates ---------------------------------------------------------------------------------------------
    def input_candidates(self, q: torch.Tensor) -> torch.Tensor:
        """Input slots ``[B, H, k]`` a retrieval for ``q [B, H, M, D]`` takes: tokens in the rank order of their
        cluster's ``q · centroid`` (then position), the first ``in_slots``."""
        score = (q.float() @ self.centroids.float().transpose(-1, -2)).amax(2)
        score = score.masked_fill(self.sizes == 0, float("-inf"))
        if self.sink is not None:  # the attention sinks: always retrieved first
            score[..., self.sink] = float("inf")
        C = score.shape[-1]
        rank = score.argsort(-1, descending=True).argsort(-1)  # [B, H, C]: 0 = best cluster
        rank = torch.cat([rank, rank.new_full((*rank.shape[:2], 1), C)], dim=-1)  # the empty slot ranks last
        P = self.assign.shape[-1]
        key = rank.gather(-1, self.assign.long()) * P + torch.arange(P, device=q.device)
        return torch.topk(-key.float(), min(self.in_slots, P), dim=-1, sorted=False).indices

    def output_candidates(self, q: torch.Tensor) -> torch.Tensor:
        """Output segments ``[B, H, k]``: the top ``out_segments`` by ``q · mean``."""
        score = (q.float() @ self.means.float().transpose(-1, -2)).amax(2)
        return torch.topk(score, min(self.out_segments, self.segments), dim=-1, sorted=False).indices

    # ---- attention ----------------------------------------------------------------------------------------------
    def gather(self, q, scaling, index_in, index_out):
        keys, values, masks = [], [], []
        if index_in is not None:
            keys.append(self.store_in.take("k", index_in).flatten(2, 3))
            values.append(self.store_in.take("v", index_in).flatten(2, 3))
            masks.append(self.assign.gather(-1, index_in) < self.sizes.shape[-1])
        if index_out is not None:
            k, v = self.store_out.take("k", index_out), self.store_out.take("v", index_out)  # [B, H, k, g, D]
            keys.append(k.flatten(2, 3))
            values.append(v.flatten(2, 3))
            masks.append(torch.ones(k.shape[:3] + k.shape[3:4], dtype=torch.bool, device=q.device).flatten(2))
        k = torch.cat(keys, dim=2).to(q.dtype)
        v = torch.cat(values, dim=2).to(q.dtype)
        return partial_attention(q, k, v, scaling, torch.cat(masks, dim=2)[:, :, None, :])

    def candidates(self, q):
        index_in = self.input_candidates(q) if self.store_in is not None else None
        index_out = self.output_candidates(q) if self.segments else None
        return index_in, index_out

    def attend(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """A retrieval for ``q`` with no earlier step to reuse (the stateless path)."""
        return self.gather(q, scaling, *self.candidates(q))

    def attend_with_state(self, q: torch.Tensor, scaling: float, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: retrieve for the heads whose query drifted past ``threshold`` from their reference query, reuse
        the retrieved set for the others (``torch.where``: no host synchronisation); ``state[STATE]`` is replaced,
        never modified."""
        query = q.float().mean(2)  # [B, H, D]
        fresh_in, fresh_out = self.candidates(q)
        prev = state.get(STATE)
        if prev is None or prev["ref"].shape != query.shape or (prev["input"] is None) != (fresh_in is None):
            drift = torch.ones(query.shape[:2], dtype=torch.bool, device=q.device)
            retrievals = torch.zeros(query.shape[:2], dtype=torch.int32, device=q.device)
            ref, index_in = query, fresh_in
            prev_out, prev_segments = None, -1
        else:
            drift = F.cosine_similarity(query, prev["ref"], dim=-1) < self.threshold
            ref = torch.where(drift[..., None], query, prev["ref"])
            retrievals = prev["retrievals"]
            index_in = None if fresh_in is None else torch.where(drift[..., None], fresh_in, prev["input"])
            prev_out, prev_segments = prev["output"], prev["segments"]
        index_out = fresh_out
        if fresh_out is not None and prev_out is not None and prev_segments == self.segments:
            index_out = torch.where(drift[..., None], fresh_out, prev_out)  # a new segment refreshes the selection
        state[STATE] = {"ref": ref, "input": index_in, "output": index_out, "segments": self.segments,
                        "retrievals": retrievals + drift.int(), "drift": drift}  # fmt: skip
        return self.gather(q, scaling, index_in, index_out)

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        parts_k, parts_v, present = [], [], []
        if self.store_in is not None:
            real = self.assign < self.sizes.shape[-1]
            parts_k.append(self.store_in.full("k")[..., 0, :])
            parts_v.append(self.store_in.full("v")[..., 0, :])
            present.append(real)
        if self.segments:
            k, v = self.store_out.full("k"), self.store_out.full("v")
            parts_k.append(k.flatten(2, 3))
            parts_v.append(v.flatten(2, 3))
            present.append(torch.ones((*k.shape[:2], k.shape[2] * k.shape[3]), dtype=torch.bool, device=k.device))
        mask = torch.cat(present, dim=2)
        return torch.cat(parts_k, dim=2)[mask].to(dtype), torch.cat(parts_v, dim=2)[mask].to(dtype)


@register
class LouisKVCodec(RetrievalCodec):
    name = "louiskv"
    paper = "LouisKV: Efficient KV Cache Retrieval for Long Input-Output Sequences"
    arxiv = "2510.11292"

    group: int = 16  # tokens per output segment (the window flushes one segment at a time)
    threshold: float = 0.9
    cluster: int = 16
    iters: int = 8
    out_segments: int = 2
    sinks: int = 4  # the first tokens, retrieved with every set (attention sinks)

    def check(self) -> None:
        super().check()
        if self.cluster < 1 or self.iters < 1 or self.out_segments < 1 or not -1.0 <= self.threshold <= 1.0:
            raise KVSqueezeError("louiskv: cluster, iters and out_segments must be >= 1, threshold in [-1, 1]")
        if self.sinks < 0:
            raise KVSqueezeError(f"louiskv: sinks must be >= 0, got {self.sinks}")

    def output_block(self, keys, values, lengths) -> LouisKVBlock:
        """Segments of ``group`` tokens of a flushed window (every head the same count, a multiple of ``group``)."""
        B, H = lengths.shape
        n = keys.shape[0] // (B * H)
        S, g = n // self.group, self.group
        kp, vp = keys.view(B, H, S, g, -1), values.view(B, H, S, g, -1)
        store = self.store_for(keys.device)
        store.put("k", kp)
        store.put("v", vp)
        return LouisKVBlock(centroids=None, sizes=None, assign=None, store_in=None, in_slots=0,
                            means=kp.float().mean(3).to(keys.dtype), store_out=store, out_segments=self.out_segments,
                            threshold=self.threshold, lengths=lengths, dim=keys.shape[-1])  # fmt: skip

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        if ctx is None:
            return self.output_block(keys, values, lengths)
        device, D, Dv = keys.device, keys.shape[-1], values.shape[-1]
        kp, counts = paginate(keys, lengths, 1)  # [B, H, P, 1, D]
        vp, _ = paginate(values, lengths, 1)
        present = counts > 0
        P = present.shape[-1]
        C = max(math.ceil(int(lengths.max()) / self.cluster), 1)
        assign = spherical_kmeans(kp[..., 0, :], present, C, self.iters)
        sink = None
        if self.sinks:  # the first stored tokens of every head: a cluster of their own, always retrieved
            sink, C = C, C + 1
            assign = assign.masked_fill(~present, C)
            assign = assign.masked_fill((torch.arange(P, device=device) < self.sinks) & present, sink)
        centroids, sizes = group_means(kp[..., 0, :], assign, C)

        e = keys.element_size()
        unit = (D + Dv) * e  # bytes of one full-cache token per head
        out_tokens = self.out_segments * self.group
        overhead = (C * (D * e + 4) + P * 4 + D * 4) / unit + self.residual + self.group + out_tokens
        fetch = self.fetch_tokens(ctx, overhead, self.cluster, "the centroids, the window and the output segments")
        in_slots = P if fetch is None else max(min(int(fetch / (1 + 8 / unit)), P), 1)  # each slot: an int64 index
        store = self.store_for(device)
        store.put("k", kp)
        store.put("v", vp)
        return LouisKVBlock(centroids=centroids.to(keys.dtype), sizes=sizes, assign=assign.to(torch.int32),
                            store_in=store, in_slots=in_slots, means=None, store_out=None,
                            out_segments=self.out_segments, threshold=self.threshold, lengths=lengths,
                            dim=D, sink=sink)  # fmt: skip

    def extend(self, block: KVBlock, newer: KVBlock) -> KVBlock | None:
        """Output segments appended to the block (one block: one retrieval decision per step)."""
        if not isinstance(block, LouisKVBlock) or not isinstance(newer, LouisKVBlock) or newer.store_in is not None:
            return None
        if not block.segments:
            means, store = newer.means, newer.store_out
        else:
            means = torch.cat([block.means, newer.means], dim=2)
            store = self.store_for(newer.means.device)
            for name in ("k", "v"):
                store.put(name, torch.cat([block.store_out.full(name), newer.store_out.full(name)], dim=2))
        return LouisKVBlock(centroids=block.centroids, sizes=block.sizes, assign=block.assign,
                            store_in=block.store_in, in_slots=block.in_slots, means=means, store_out=store,
                            out_segments=self.out_segments, threshold=self.threshold,
                            lengths=block.lengths + newer.lengths, dim=block.dim, sink=block.sink)  # fmt: skip
