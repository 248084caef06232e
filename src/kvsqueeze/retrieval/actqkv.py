"""``actqkv``: a probe query per window chosen by its activation bias picks each window's representative keys (kept
hot); per decoding step the representatives score the windows and a per-layer cut-off from the information density
of those scores decides how many windows are fetched from the cold tier.

Paper: "Activation-aware Probe-Query: Effective Key-Value Retrieval for Long-Context LLMs Inference", Xiao et al.,
arXiv 2502.13542.

- The stored tokens of every (row, KV head) are cut into windows of ``window`` consecutive tokens (the paper's
  memory units); keys and values go to the cold tier (:class:`~kvsqueeze.core.tiers.ColdStore`, ``tier=ram|disk``).
- *Activation bias* at prefill: within a window, a token's bias is the squared distance of its query activations
  from the window's mean query, summed over the KV head's query heads. The token with the largest bias is the
  window's *probe query* (the window's anchor token); the ``reps`` keys of the window with the largest ``probe·k``
  (largest over the query heads) are the window's representatives, kept hot at the model's dtype.
- Per decoding step a window's score is its best representative's ``q·k`` (largest over the head's queries). The
  *dynamic cut-off*: the windows' scores, as a softmax (times the attention scaling), have an entropy ``E``; its
  information density ``1 - E / log n`` (``n`` windows; 1 = all mass on one window) sets the windows fetched,
  ``ceil(k_max · E / log n)`` (at least ``least``), per row and layer (the heads' mean entropy). In torch, with no
  host synchronisation: the ``k_max`` best windows are always fetched, those ranked beyond the cut-off are masked.
  Fetched windows are attended with the recent window (the cache's full-precision tail, ``residual`` tokens).
- Hot budget: ``ratio``/``budget`` give each head's hot tokens; representatives (``reps/2`` tokens' worth per
  window), counts and the recent window are charged first, ``k_max`` is the rest in whole windows (``fetch=``
  overrides).

Deviations: the paper's text beyond its abstract was not retrievable here; the activation-bias indicator and the
cut-off rule above are reconstructed from its description (a token-level deviation of activations inside each
window; a per-layer recall size from the information density of the retrieval scores). The paper builds its probe
in a chunked (sliding-window) prefill and retrieves during the prefill as well; here the prefill attention is exact
and the probe queries only choose what stays hot; at decoding the step's own queries score the windows. Grouped
queries pool by the largest score. Tokens decoded after the prefill stay in the hot window. No custom kernels.
"""

from __future__ import annotations

import torch

from kvsqueeze.core.attention_math import partial_attention
from kvsqueeze.core.storage import KVBlock
from kvsqueeze.core.tiers import ColdStore, paginate, unpaginate
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.retrieval.base import RetrievalCodec
from kvsqueeze.spec import register


def activation_bias(q: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Activation bias ``[..., n]`` of the queries ``q [..., G, n, D]`` of a window's tokens (``present [..., n]``):
    squared distance from the mean of the present tokens' queries, summed over the ``G`` query heads (absent:
    -inf)."""
    w = present[..., None, :, None].to(q.dtype)
    mean = (q * w).sum(-2, keepdim=True) / w.sum(-2, keepdim=True).clamp(min=1)
    bias = (q - mean).pow(2).sum(-1).sum(-2)
    return bias.masked_fill(~present, float("-inf"))


def cutoff(score: torch.Tensor, scaling: float, k_max: int, least: int) -> torch.Tensor:
    """Windows to keep ``[B, 1]`` (int64, in ``[least, k_max]``) from window scores ``score [B, H, P]`` (-inf =
    no window): ``ceil(k_max · E / log n)`` with ``E`` the entropy of ``softmax(scaling · score)`` (mean over the
    heads) and ``n`` the windows there are."""
    logits = score.float() * scaling
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum(-1)  # [B, H]
    n = torch.isfinite(score).sum(-1).clamp(min=1)
    spread = (entropy / torch.log(n.double()).clamp(min=1e-12).float()).clamp(0, 1)
    spread = torch.where(n > 1, spread, torch.zeros_like(spread)).mean(-1, keepdim=True)  # [B, 1]
    return (spread * k_max).ceil().long().clamp(min=min(least, k_max), max=k_max)


class ActQKVBlock(KVBlock):
    """Hot: representatives ``reps [B, H, P, R, D]`` (``rep_ok``), ``counts [B, H, P]``; cold: keys/values pages
    ``[B, H, P, window, D]``."""

    def __init__(self, reps, rep_ok, counts, store: ColdStore, lengths, pages_per_step: int, least: int, dim: int):
        self.reps, self.rep_ok, self.counts, self.store = reps, rep_ok, counts, store
        self.lengths, self.pages_per_step, self.least, self.dim = lengths.cpu(), pages_per_step, least, dim
        self.page = store.arrays["k"].shape[3] if "k" in store.arrays else store.maps["k"][2][3]

    def window_scores(self, q: torch.Tensor) -> torch.Tensor:
        """Each window's best representative ``q·k`` ``[B, H, P]`` for grouped queries ``q [B, H, M, D]`` (largest
        over the queries; -inf = empty window)."""
        s = torch.einsum("bhmd,bhprd->bhpmr", q.float(), self.reps.float())
        s = s.masked_fill(~self.rep_ok[:, :, :, None, :], float("-inf")).amax(-1).amax(-1)
        return s.masked_fill(self.counts == 0, float("-inf"))

    def select(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Windows fetched ``[B, H, k_max]`` (best first), whether each is used (a real window within the
        cut-off), and the cut-off ``[B, 1]``."""
        score = self.window_scores(q)
        k = min(self.pages_per_step, score.shape[-1])
        values, index = torch.topk(score, k, dim=-1, sorted=True)
        keep = cutoff(score, scaling, k, self.least)
        used = torch.isfinite(values) & (torch.arange(k, device=q.device)[None, None, :] < keep[:, :, None])
        return index, used, keep

    def attend(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        index, used, _ = self.select(q, scaling)
        keys, values = self.store.take("k", index), self.store.take("v", index)  # [B, H, k, window, D]
        counts = self.counts.gather(-1, index)
        present = (torch.arange(self.page, device=q.device)[None, None, None, :] < counts[..., None]) & used[..., None]
        mask = present.flatten(2)[:, :, None, :]
        return partial_attention(q, keys.flatten(2, 3).to(q.dtype), values.flatten(2, 3).to(q.dtype), scaling, mask)

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        counts = self.counts.to(self.reps.device)
        return unpaginate(self.store.full("k"), counts).to(dtype), unpaginate(self.store.full("v"), counts).to(dtype)


def representatives(kp, present, qp, has_q, reps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per window: the probe (the token of largest activation bias) and the ``reps`` keys it scores highest.

    ``kp [B, H, P, c, D]`` pages of keys, ``present [B, H, P, c]``, ``qp [B, H, P, G, c, D]`` the tokens' queries
    (``has_q``: whether a token has one). Returns ``(reps [B, H, P, R, D], rep_ok [B, H, P, R], anchor [B, H, P])``;
    a window without queries takes its keys of largest norm."""
    bias = activation_bias(qp.float(), has_q)  # [B, H, P, c]
    anchor = bias.argmax(-1)  # [B, H, P]
    B, H, P, G, c, D = qp.shape
    probe = qp.gather(4, anchor[:, :, :, None, None, None].expand(B, H, P, G, 1, D))[..., 0, :]  # [B, H, P, G, D]
    score = (probe.float() @ kp.float().transpose(-1, -2)).amax(-2)  # [B, H, P, c]
    score = torch.where(has_q.any(-1, keepdim=True), score, kp.float().norm(dim=-1))
    score = score.masked_fill(~present, float("-inf"))
    top, idx = torch.topk(score, min(reps, c), dim=-1)
    chosen = kp.gather(3, idx[..., None].expand(*idx.shape, D))
    return chosen, torch.isfinite(top), anchor


@register
class ActQKVCodec(RetrievalCodec):
    name = "actqkv"
    paper = "Activation-aware Probe-Query: Effective Key-Value Retrieval for Long-Context LLMs Inference"
    arxiv = "2502.13542"

    window: int = 16
    reps: int = 2
    least: int = 1
    fixed_window = True

    def check(self) -> None:
        super().check()
        if self.window < 1 or self.reps < 1 or self.least < 1:
            raise KVSqueezeError("actqkv: window, reps and least must be >= 1")

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        if ctx is None:
            raise KVSqueezeError("actqkv keeps decoded tokens in its hot window; drop group=")
        device, D, Dv = keys.device, keys.shape[-1], values.shape[-1]
        c = self.window
        kp, counts = paginate(keys, lengths, c)  # [B, H, P, c, D]
        vp, _ = paginate(values, lengths, c)
        present = torch.arange(c, device=device)[None, None, None, :] < counts[..., None]
        B, H, L = ctx.stored.shape
        P = counts.shape[-1]
        q = ctx.queries
        if q is None or q.shape[2] == 0:
            G = 1
            qp = kp.new_zeros(B, H, P, 1, c, D)
            has_q = torch.zeros_like(present)
        else:
            G, Lq = q.shape[1] // H, q.shape[2]
            cols = torch.arange(L, device=device)[None, None, :].expand(B, H, L)[ctx.stored.to(device)]
            colp = paginate(cols[:, None], lengths, c)[0][..., 0]  # [B, H, P, c] column of each token
            qi = colp - (L - Lq)
            has_q = present & (qi >= 0)
            idx = qi.clamp(min=0).reshape(B, H, 1, P * c, 1).expand(B, H, G, P * c, D)
            qp = q.to(device).reshape(B, H, G, Lq, D).gather(3, idx).view(B, H, G, P, c, D).permute(0, 1, 3, 2, 4, 5)
        rep_keys, rep_ok, _ = representatives(kp, present, qp, has_q, self.reps)

        e = keys.element_size()
        unit = (D + Dv) * e  # bytes of one full-cache token per head
        R = rep_keys.shape[3]
        overhead = P * (R * D * e + R + 4) / unit + self.residual
        fetch = self.fetch_tokens(ctx, overhead, c, "the representatives and the window")
        pages = P if fetch is None else max(min(fetch // c, P), 1)
        store = self.store_for(device)
        store.put("k", kp)
        store.put("v", vp)
        return ActQKVBlock(rep_keys.contiguous(), rep_ok, counts.to(torch.int32), store, lengths, pages, self.least, D)
