"""Batched k-means for the retrieval codecs: one independent clustering per group (a (row, KV head)), all groups in
one tensor program (no loop over groups, rows or heads; a fixed number of Lloyd iterations)."""

from __future__ import annotations

import torch


def kmeans(
    x: torch.Tensor, present: torch.Tensor, k: int, iters: int = 8, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the present points of ``x [G, L, D]`` (``present [G, L]``, a prefix of each group) into
    ``k`` clusters per group, float32.

    Initial centroids are ``k`` points evenly spaced over each group's present points (deterministic); a cluster that
    empties keeps its previous centroid. ``weight [G, L]``: per-point weights of the centroid means (default 1).
    Returns ``(centroids [G, k, D], labels [G, L] (absent points: 0), counts [G, k])``."""
    G, L, D = x.shape
    x = x.float()
    n = present.sum(-1)  # [G]
    slot = ((torch.arange(k, device=x.device, dtype=torch.float64)[None, :] + 0.5) * n[:, None] / k).long()
    slot = slot.clamp(max=max(L - 1, 0)).minimum((n[:, None] - 1).clamp(min=0))
    centroids = x.gather(1, slot[..., None].expand(G, k, D))
    w = present.float() if weight is None else weight.float() * present
    sq = (x * x).sum(-1, keepdim=True)  # [G, L, 1]
    base = (torch.arange(G, device=x.device) * k)[:, None]
    labels = torch.zeros(G, L, dtype=torch.long, device=x.device)
    counts = torch.zeros(G, k, device=x.device)
    for _ in range(max(iters, 0) + 1):  # the last pass only assigns
        labels = nearest(x, sq, centroids)
        flat = (labels + base).flatten()
        sums = torch.zeros(G * k, D, device=x.device).index_add_(0, flat, (x * w[..., None]).flatten(0, 1))
        counts = torch.zeros(G * k, device=x.device).index_add_(0, flat, w.flatten()).view(G, k)
        if _ == iters:
            break
        mean = sums.view(G, k, D) / counts.clamp(min=1e-12)[..., None]
        centroids = torch.where(counts[..., None] > 0, mean, centroids)
    return centroids, labels.masked_fill(~present, 0), counts


def nearest(x: torch.Tensor, sq: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid ``[G, L]`` (squared Euclidean distance) of ``x [G, L, D]`` (``sq``: its squared
    norms ``[G, L, 1]``) among ``centroids [G, k, D]``."""
    dist = torch.baddbmm(sq + (centroids * centroids).sum(-1)[:, None, :], x, centroids.transpose(1, 2), alpha=-2.0)
    return dist.argmin(-1)
