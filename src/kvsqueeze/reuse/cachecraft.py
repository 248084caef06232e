"""Cache-Craft — "Cache-Craft: Managing Chunk-Caches for Efficient Retrieval-Augmented Generation" (Agarwal et al.,
arXiv 2502.15734).

A chunk's cache, computed inside one request's prompt, is reused in later prompts at other positions. How much of
it can be reused depends on how much its tokens attended to the *other* chunks of the prompt it was computed in:

- when a chunk is stored, each of its tokens gets its *inter-chunk attention* — the attention mass its queries put
  on the chunks before it (mean over layers and query heads; the shared head, identical in every prompt, is not a
  chunk) — and the chunk its *context impact* (CCI), the mean over its tokens, with the ids of the chunks that
  preceded it;
- reusing it in a new prompt: its keys are re-encoded to the new position, and its *deviation* is its CCI scaled by
  how much its preceding chunks changed, ``CCI × (1 − Jaccard(prefix chunks then, now))``. A chunk whose deviation
  exceeds ``max_deviation`` is not reusable and is recomputed whole; the others share a budget of ``fraction`` of
  the context's tokens in proportion to their deviation (a chunk's share capped at its length, the rest going to the
  others: :func:`shares`), each recomputing its tokens of highest inter-chunk
  attention (selective recomputation in context, :mod:`kvsqueeze.reuse.recompute`);
- a variant computed with no chunk before it had nothing to attend to: its measured CCI (0) says nothing about how
  much it depends on context. Placed after other chunks, it takes the mean CCI of the store's variants that were
  computed after other chunks (``ChunkStore.impact``), and its first tokens are the ones recomputed (the start of a
  chunk is where attention to the context before it concentrates, as EPIC, arXiv 2410.15332, found);
- the chunk store (:class:`ChunkStore`) keeps variants of a chunk computed in different contexts (the one whose
  preceding chunks overlap the new prompt's most is used) under a byte limit, evicting the variant of lowest value:
  its uses with an exponential decay per store access (frequency and recency), times ``1 − CCI`` (what a reuse
  saves), per byte.

Deviations: the prior CCI and first-token choice for a variant computed with no preceding chunk are ours (the
paper measures CCI where the chunk was computed and does not single out that case). The paper calibrates how many
tokens to recompute per unit of CCI offline on a model; here one ``fraction`` of the context is shared among the
deviating chunks (a fixed budget, the knob the paper's curves trade). Its CPU–GPU cache tiers and the overlap of
recomputation with loading are serving-engine work left out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.compat import with_cache
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.reuse.kvlink import shift_keys
from kvsqueeze.reuse.recompute import recompute_tokens
from kvsqueeze.schedules.rerotate import rope_of


def chunk_id(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:24]


@dataclass
class Variant:
    """One chunk's cache as computed in one prompt: keys/values per layer ``[1, H, n, D]`` at positions from
    ``start``, its tokens' inter-chunk attention ``[n]``, and the chunks that preceded it."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    start: int
    attention: torch.Tensor
    before: frozenset[str]
    uses: float = 0.0

    @property
    def impact(self) -> float:
        return float(self.attention.mean()) if self.attention.numel() else 0.0

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (*self.keys, *self.values))


@dataclass
class ChunkStore:
    """Chunk-cache variants by chunk id, at most ``max_bytes`` (see the module docstring for the eviction value)."""

    max_bytes: int = 2 << 30
    decay: float = 0.95
    variants: dict[str, list[Variant]] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(v.nbytes for vs in self.variants.values() for v in vs)

    def impact(self, variant: Variant) -> float:
        """``variant``'s context impact; for one computed with no preceding chunk (nothing measured), the mean impact
        of the variants computed after other chunks (0 when the store holds none)."""
        if variant.before:
            return variant.impact
        measured = [v.impact for vs in self.variants.values() for v in vs if v.before]
        return sum(measured) / len(measured) if measured else 0.0

    def best(self, chunk: str, before: frozenset[str]) -> Variant | None:
        """The variant of ``chunk`` whose preceding chunks overlap ``before`` most (its use counted)."""
        found = self.variants.get(chunk)
        if not found:
            return None
        for variants in self.variants.values():
            for v in variants:
                v.uses *= self.decay
        variant = max(found, key=lambda v: jaccard(v.before, before))
        variant.uses += 1.0
        return variant

    def add(self, chunk: str, variant: Variant) -> None:
        if variant.nbytes > self.max_bytes:
            raise KVSqueezeError(f"a {variant.nbytes}-byte chunk does not fit a chunk store of {self.max_bytes} bytes")
        self.variants.setdefault(chunk, []).append(variant)
        while self.nbytes() > self.max_bytes:
            victim = min(((c, v) for c, vs in self.variants.items() for v in vs if v is not variant),
                         key=lambda cv: value(cv[1]))  # fmt: skip
            self.variants[victim[0]].remove(victim[1])
            if not self.variants[victim[0]]:
                del self.variants[victim[0]]


def value(variant: Variant) -> float:
    """What keeping a variant is worth per byte: decayed uses × the part of a prefill its reuse saves."""
    return (variant.uses + 1e-3) * (1.0 - variant.impact) / max(variant.nbytes, 1)


def recompute_order(variant: Variant) -> torch.Tensor:
    """A variant's token indices, first to recompute first: by inter-chunk attention, highest first; for a variant
    computed with no preceding chunk (no attention measured), from its first token on."""
    n = variant.attention.numel()
    if not variant.before:
        return torch.arange(n)
    return torch.topk(variant.attention, n).indices


def shares(budget: int, deviations: list[float], sizes: list[int]) -> list[int]:
    """Whole tokens each chunk recomputes: ``budget`` split in proportion to ``deviations``, each chunk capped at its
    size with what a capped chunk cannot take shared among the others, remainders to the largest fractions; the total
    is ``min(budget, sizes of the deviating chunks)`` (so ``fraction=1`` recomputes every deviating chunk whole)."""
    out = [0] * len(sizes)
    open_ = [i for i, d in enumerate(deviations) if d > 0 and sizes[i] > 0]
    left = min(budget, sum(sizes[i] for i in open_))
    while open_ and left > 0:  # setup-time loop over a prompt's chunks; ends when no chunk is capped
        total = sum(deviations[i] for i in open_)
        want = {i: left * deviations[i] / total for i in open_}
        capped = [i for i in open_ if want[i] >= sizes[i]]
        if not capped:
            floors = {i: int(want[i]) for i in open_}
            extra = left - sum(floors.values())
            for i in sorted(open_, key=lambda i: want[i] - floors[i], reverse=True)[:extra]:
                floors[i] += 1
            for i in open_:
                out[i] += floors[i]
            break
        for i in capped:
            out[i] = sizes[i]
            left -= sizes[i]
        open_ = [i for i in open_ if i not in capped]
    return out


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return 1.0 if not a and not b else len(a & b) / len(a | b)


@torch.no_grad()
def prefill_chunks(model, head: torch.Tensor, chunks: list[torch.Tensor]) -> tuple[CompressedCache, list[Variant]]:
    """Prefill ``head`` + ``chunks`` as one prompt; return its cache and every chunk's variant with the inter-chunk
    attention of its tokens (the attention of its queries to the chunks before it)."""
    ids = torch.cat([head, *chunks], dim=-1)
    starts = [head.shape[-1]]
    for c in chunks:
        starts.append(starts[-1] + c.shape[-1])
    inter = torch.zeros(ids.shape[-1])
    layers = 0

    def observe(layer_idx, call, keys, values):
        nonlocal layers
        q = call.queries[0].float()  # [Hq, L, D]
        k = keys[0].float().repeat_interleave(q.shape[0] // keys.shape[1], dim=0)
        logits = torch.matmul(q, k.transpose(-1, -2)) * call.scaling
        L = logits.shape[-1]
        logits = logits.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # [Hq, L, L]
        cols = torch.arange(L, device=q.device)
        for i in range(len(chunks)):  # setup-time loop over the prompt's chunks
            a, b = starts[i], starts[i + 1]
            outside = (cols >= starts[0]) & (cols < a)  # earlier chunks (the shared head is no chunk)
            inter[a:b] += probs[:, a:b][:, :, outside].sum(-1).mean(0).cpu()
        layers += 1

    cache = CompressedCache(model, "none")
    cache.attention_observer = observe
    model(input_ids=ids.to(model.device), **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    cache.attention_observer = None
    cache.tokens = ids.cpu()
    inter /= max(layers, 1)
    ids_of = [chunk_id(c) for c in chunks]
    variants = []
    for i in range(len(chunks)):
        a, b = starts[i], starts[i + 1]
        variants.append(Variant([layer.keys[:, :, a:b].clone() for layer in cache.layers],
                                [layer.values[:, :, a:b].clone() for layer in cache.layers], a, inter[a:b].clone(),
                                frozenset(ids_of[:i])))  # fmt: skip
    return cache, variants


@torch.no_grad()
def assemble(model, head: CompressedCache, chunks: list[torch.Tensor], store: ChunkStore, fraction: float = 0.15,
             max_deviation: float = 0.5) -> tuple[CompressedCache, int]:  # fmt: skip
    """The cache of ``head`` + ``chunks`` from stored variants (see the module docstring) and how many context tokens
    were recomputed. Chunks the store does not hold are computed in context (and count as recomputed)."""
    if not 0.0 <= fraction <= 1.0:
        raise KVSqueezeError(f"cachecraft's fraction must be in [0, 1], got {fraction}")
    if not chunks:
        raise KVSqueezeError("cachecraft needs at least one chunk")
    rope = rope_of(model)
    ids_of = [chunk_id(c) for c in chunks]
    h = head.get_seq_length()
    ids = torch.cat([head.tokens, *chunks], dim=-1)
    parts_k = [[layer.keys] for layer in head.layers]
    parts_v = [[layer.values] for layer in head.layers]
    offset, whole, plans = h, [], []
    for i, c in enumerate(chunks):
        n = c.shape[-1]
        variant = store.best(ids_of[i], frozenset(ids_of[:i]))
        if variant is None:  # not stored: computed in context below (placeholders until then)
            keys = [layer.keys.new_zeros(*layer.keys.shape[:2], n, layer.keys.shape[-1]) for layer in head.layers]
            values = [
                layer.values.new_zeros(*layer.values.shape[:2], n, layer.values.shape[-1]) for layer in head.layers
            ]
            whole.append(torch.arange(offset, offset + n))
        else:
            keys = [shift_keys(k, offset - variant.start, rope) for k in variant.keys]
            values = variant.values
            deviation = store.impact(variant) * (1.0 - jaccard(variant.before, frozenset(ids_of[:i])))
            if deviation > max_deviation:
                whole.append(torch.arange(offset, offset + n))
            else:
                plans.append((offset, recompute_order(variant), deviation))
        for pk, pv, k, v in zip(parts_k, parts_v, keys, values, strict=True):
            pk.append(k)
            pv.append(v)
        offset += n
    out = CompressedCache(model, "none")
    for layer, pk, pv in zip(out.layers, parts_k, parts_v, strict=True):
        layer.update(torch.cat(pk, dim=-2), torch.cat(pv, dim=-2))  # one copy per layer
    context = offset - h
    counts = shares(round(fraction * context), [d for _, _, d in plans], [o.numel() for _, o, _ in plans])
    chosen = list(whole)
    for (start, order, _), share in zip(plans, counts, strict=True):
        if share:
            chosen.append(start + order[:share].sort().values)
    positions = torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.long)
    recompute_tokens(model, out, ids, positions)
    out.tokens = ids.cpu()
    return out, int(positions.numel())
