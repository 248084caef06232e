"""KVShare — "KVShare: An LLM Service System with Efficient and Effective Multi-Tenant KV Cache Reuse" (Yang et al.,
arXiv 2503.16525).

Cross-request reuse: a new prompt is aligned with the cached prompts of earlier requests (of any tenant) and reuses
the keys/values of the tokens that match, whatever their positions, recomputing only what deviates:

- *alignment* (the paper's adaptive-length chunks): the token ids are matched against each cached request by
  shared ``min_match``-grams (runs of at least ``min_match`` equal tokens, found by hashing); cached requests
  serve by decreasing *hit rate* (matched fraction of the new prompt), each the tokens no better one covers;
  matched tokens take its keys (re-encoded from their old positions to their new ones) and values, unmatched
  tokens are computed;
- *Dual-Stage High Deviation* (DHD): at prefill, the model's first ``probe + 1`` layers run over the whole prompt
  and each matched token's deviation is the relative distance between its reused key and its key in context at
  layer ``probe``; the ``fraction`` of matched tokens that deviate most are recomputed with the unmatched ones
  (selective recomputation in context, :mod:`kvsqueeze.reuse.recompute`). At decode, the attention the first
  generated token pays to reused tokens picks the ``decode_fraction`` of them (not recomputed yet) that it
  attends to most, and those are recomputed before the next token (:func:`refresh_at_decode`);
- *cache-aware scheduling*: :func:`schedule` orders a batch of requests by hit rate, highest first (their prefill
  is shortest, so the mean time to first token falls), ties kept in arrival order.

Deviations: the paper's chunk lengths adapt to the edit distance; here a match is any run of at least
``min_match`` tokens the cached request holds (a repeated run is taken from its first occurrence there). Its
continuous-batching integration is serving-engine work left out (a scheduled batch runs one request after another).
The decode stage runs once, after the first generated token (the paper decides per step).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.compat import with_cache
from kvsqueeze.core.rope import rerope
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.reuse.recompute import recompute_tokens
from kvsqueeze.schedules.rerotate import rope_of


class StopForward(Exception):
    """Raised by the probe's observer once the probed layer has attended (the rest of the forward is not needed)."""


@dataclass
class Cached:
    ids: torch.Tensor  # [1, L] the cached request's prompt
    cache: CompressedCache  # its uncompressed cache


@dataclass
class Index:
    """Cached requests (uncompressed prompt caches), searched by alignment."""

    requests: list[Cached] = field(default_factory=list)
    min_match: int = 8

    def add(self, ids: torch.Tensor, cache: CompressedCache) -> None:
        self.requests.append(Cached(ids.cpu(), cache))

    def sources(self, ids: torch.Tensor) -> tuple[list[tuple[Cached, torch.Tensor]], torch.Tensor]:
        """Where each token of ``ids [1, L]`` is reused from: cached requests by decreasing hit rate, each filling the
        tokens no better-matching request covers; returns ``[(request, source positions [L], -1 elsewhere)]`` and
        the matched mask ``[L]``."""
        new = ids[0].cpu()
        aligned = [(c, align(new, c.ids[0], self.min_match)) for c in self.requests]
        aligned.sort(key=lambda cs: -int((cs[1] >= 0).sum()))
        matched = torch.zeros(len(new), dtype=torch.bool)
        out = []
        for cached, source in aligned:
            take = (source >= 0) & ~matched
            if take.any():
                out.append((cached, torch.where(take, source, -1)))
                matched |= take
        return out, matched


MODULUS = 2_147_483_647  # a prime below 2**31: a gram's hash times a token id stays well inside int64
BASE = 1_000_003


def gram_hashes(ids: torch.Tensor, g: int) -> torch.Tensor:
    """A polynomial hash modulo :data:`MODULUS` of every ``g``-gram of ``ids [n]`` (``[n - g + 1]``)."""
    windows = ids.long().unfold(0, g, 1)
    h = torch.zeros(windows.shape[0], dtype=torch.long)
    for k in range(g):  # over the few tokens of a gram, vectorized over positions
        h = (h * BASE + windows[:, k]) % MODULUS
    return h


def align(new: torch.Tensor, old: torch.Tensor, min_match: int) -> torch.Tensor:
    """Per token of ``new [n]``, its position in ``old [m]`` within a matching block of at least ``min_match``
    tokens, or -1. Every ``min_match``-gram of ``new`` that occurs in ``old`` is a match (at its first occurrence
    there; found by hash, then checked token by token), so pieces that moved past each other (documents in another
    order) all match; a token covered by several matched grams takes its position from the one that starts last."""
    n, m, g = new.numel(), old.numel(), min_match
    source = torch.full((n,), -1, dtype=torch.long)
    if n < g or m < g:
        return source
    old_hash, order = torch.sort(gram_hashes(old, g), stable=True)  # equal hashes keep their first place first
    new_hash = gram_hashes(new, g)
    slot = torch.searchsorted(old_hash, new_hash).clamp(max=m - g)
    at = order[slot]  # [n - g + 1] a candidate place in old of new's gram starting at i
    found = old_hash[slot] == new_hash
    offsets = torch.arange(g)
    found &= (old[(at[:, None] + offsets).clamp(max=m - 1)] == new.unfold(0, g, 1)).all(dim=1)  # no collision
    starts = torch.where(found, torch.arange(n - g + 1), -1)
    last = torch.cummax(torch.cat([starts, starts.new_full((g - 1,), -1)]), dim=0).values  # latest start <= t
    t = torch.arange(n)
    covered = (last >= 0) & (t - last < g)
    source[covered] = at[last[covered]] + (t - last)[covered]
    return source


def hit_rate(index: Index, ids: torch.Tensor) -> float:
    """The fraction of ``ids``' tokens the index can reuse."""
    _, matched = index.sources(ids)
    return float(matched.float().mean()) if matched.numel() else 0.0


def schedule(index: Index, prompts: list[torch.Tensor]) -> list[int]:
    """The order to serve ``prompts`` in: highest hit rate first, ties in arrival order."""
    rates = [hit_rate(index, p) for p in prompts]
    return sorted(range(len(prompts)), key=lambda i: (-rates[i], i))


@torch.no_grad()
def probe_keys(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Keys ``[1, H, L, D]`` of layer ``layer`` in a full prefill of ``ids`` (the forward stops after that layer)."""
    found = {}

    def observe(layer_idx, call, keys, values):
        if layer_idx == layer:
            found["keys"] = keys
            raise StopForward

    probe = CompressedCache(model, "none")
    probe.attention_observer = observe
    with contextlib.suppress(StopForward):
        model(input_ids=ids.to(model.device), **with_cache(model, probe), use_cache=True, logits_to_keep=1)
    if "keys" not in found:
        raise KVSqueezeError(f"kvshare's probe layer {layer} is not an attention layer of this model")
    return found["keys"]


@torch.no_grad()
def assemble(model, index: Index, ids: torch.Tensor, fraction: float = 0.15, probe: int = 1
             ) -> tuple[CompressedCache, torch.Tensor]:  # fmt: skip
    """A cache of ``ids [1, L]`` from the best cached request, with the unmatched and the ``fraction`` most deviating
    matched tokens recomputed; returns it and the recomputed positions."""
    if not 0.0 <= fraction <= 1.0:
        raise KVSqueezeError(f"kvshare's fraction must be in [0, 1], got {fraction}")
    n_layers = model.config.get_text_config().num_hidden_layers
    if not 0 <= probe < n_layers:
        raise KVSqueezeError(f"kvshare's probe layer must be in [0, {n_layers - 1}], got {probe}")
    inv, _ = rope_of(model)
    sources, matched = index.sources(ids)
    L = ids.shape[-1]
    out = CompressedCache(model, "none")
    if not sources:  # nothing to reuse: a plain prefill
        model(input_ids=ids.to(model.device), **with_cache(model, out), use_cache=True, logits_to_keep=1)
        out.tokens = ids.cpu()
        return out, torch.arange(L)
    for idx, mine in enumerate(out.layers):
        first = sources[0][0].cache.layers[idx]
        B, H, _, D = first.keys.shape
        keys = first.keys.new_zeros(B, H, L, D)  # unmatched positions are recomputed below
        values = first.values.new_zeros(B, H, L, first.values.shape[-1])
        for cached, source in sources:  # setup-time loop over the few source requests
            take = torch.nonzero(source >= 0).flatten()
            theirs = cached.cache.layers[idx]
            got = theirs.keys[:, :, source[take].to(theirs.keys.device)]
            shift = (take - source[take]).repeat(B * H)  # positions each reused key moves by
            moved = rerope(got.reshape(-1, D).float(), shift, inv, 1.0).to(got.dtype).view(B, H, -1, D)
            keys[:, :, take.to(keys.device)] = moved
            values[:, :, take.to(keys.device)] = theirs.values[:, :, source[take].to(theirs.keys.device)]
        mine.update(keys, values)
    fresh = probe_keys(model, ids, probe)
    reused = out.layers[probe].keys
    deviation = (fresh.float() - reused.float()).norm(dim=-1).mean(dim=(0, 1)) / fresh.float().norm(dim=-1).mean(
        dim=(0, 1)
    ).clamp(min=1e-12)  # [L]
    deviation = deviation.cpu().masked_fill(~matched, float("-inf"))
    count = round(fraction * int(matched.sum()))
    high = torch.topk(deviation, count).indices if count else torch.zeros(0, dtype=torch.long)
    positions = torch.cat([torch.nonzero(~matched).flatten(), high]).unique().sort().values
    recompute_tokens(model, out, ids, positions)
    out.tokens = ids.cpu()
    return out, positions


@torch.no_grad()
def refresh_at_decode(model, cache: CompressedCache, ids: torch.Tensor, token: int, reused: torch.Tensor,
                      decode_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """DHD's decode stage: feed the first generated ``token`` (after ``ids [1, L]``, all held by ``cache``), then
    recompute the reused positions (bool ``reused [L]``) it attends to most. Returns the recomputed positions and
    the logits ``[V]`` that follow ``token`` (computed before the recomputation: it corrects the tokens after)."""
    L = ids.shape[-1]
    attention = torch.zeros(L)

    def observe(layer_idx, call, keys, values):
        q = call.queries[0, :, -1:].float()  # [Hq, 1, D]
        k = keys[0].float().repeat_interleave(q.shape[0] // keys.shape[1], dim=0)
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * call.scaling, dim=-1)  # [Hq, 1, L + 1]
        attention.add_(probs[:, 0, :L].mean(0).cpu())

    cache.attention_observer = observe
    try:
        logits = model(input_ids=torch.tensor([[token]], device=model.device), **with_cache(model, cache),
                       use_cache=True, logits_to_keep=1).logits[0, -1].float().cpu()  # fmt: skip
    finally:
        cache.attention_observer = None
    count = round(decode_fraction * int(reused.sum()))
    if count == 0:
        return torch.zeros(0, dtype=torch.long), logits
    positions = torch.topk(attention.masked_fill(~reused, float("-inf")), count).indices.sort().values
    recompute_tokens(model, cache, torch.cat([ids, torch.tensor([[token]])], dim=-1), positions)
    return positions, logits
