"""EpiCache — "EpiCache: Episodic KV Cache Management for Long Conversational Question Answering" (Kim et al.,
arXiv 2509.17396).

A long conversation is answered under a fixed KV budget:

1. **Episodes**: the history is cut into segments of ``segment`` messages, each embedded; k-means (k-means++
   seeding from a seeded generator, Lloyd iterations in batched torch) groups them into ``episodes`` clusters. Each
   episode has a centroid (the mean embedding) and a medoid (its segment of highest cosine to the centroid).
2. **Episode-specific eviction during a block-wise prefill**: for each episode a cache is prefilled ``block``
   tokens at a time (the ``blockwise`` schedule, :mod:`kvsqueeze.schedules.blockwise`). After every block the
   episode's *patched prompt* (its medoid's tokens) is run after the held tokens (``cache.replay``: it leaves no
   trace) and its queries score the held tokens — SnapKV with a foreign observation window (:class:`EpisodeScorer`):
   the summed softmax attention of the patched prompt's queries, averaged over each KV group, smoothed by 1-D
   average pooling (``kernel``). Each layer is then recompressed to its budget. A block holds ``block − patch``
   conversation tokens, so with the patched prompt a layer never holds more than ``budget + block`` tokens.
3. **Sensitivity-aware layer budgets**: each layer's sensitivity is measured on a calibration text (the essays of
   :mod:`kvsqueeze.calibration.store`) as ``1 − cos`` between the attention output of the text's last ``patch``
   queries over every key and over the keys SnapKV keeps at the target ratio; layer budgets are
   ``L × M × s_l^alpha / Σ s^alpha`` (total ``L × M`` tokens per head, as a uniform budget ``M``).
4. **Routing**: a question is embedded like the segments and answered from the cache of the episode whose centroid
   is nearest in cosine.

k-means runs on the embeddings as they come (the lexical ones are unit vectors, so it clusters by cosine).

Deviations from the paper:
- No sentence encoder ships offline, so the default embedder (``embedder="lexical"``) is TF-IDF over token ids: a
  segment's vector holds ``(1 + log tf) · log(N / df)`` for each token id of the conversation (``N`` segments,
  ``df`` the segments holding the token), unit-normalized; a question is embedded with the conversation's IDF.
  ``embedder="hidden"`` uses the served LM instead: the mean hidden state of layer ``embed_layer`` (default: the
  middle one) over the segment's tokens, each segment run alone (measured on ``convqa``: it sends every question
  to one episode, see ``docs/results/convqa``).
- The sensitivity is measured per layer in isolation (the layer's own attention output with its keys evicted,
  other layers exact) on the attention output, not on the key states of later layers under a block-prefill mask.
- The patched prompt is the medoid segment's first ``patch`` tokens (the paper uses the whole medoid segment).
- ``alpha`` defaults to 1 (no sharpening search); budgets are rounded to whole tokens (largest remainders).
- Caches of every episode are held in memory (``nbytes``: all of them; ``hot_nbytes``: the one a question reads),
  not offloaded; save one with ``episode.cache.save(path)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field

from kvsqueeze.conversation import eos_ids, greedy, question_ids, render
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.context import LayerContext
from kvsqueeze.data import essays
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policies.base import Scorer
from kvsqueeze.policies.snapkv import pool_scores
from kvsqueeze.prompts import encode
from kvsqueeze.schedules.blockwise import DEFERRED, prefill_blocks
from kvsqueeze.spec import register
from kvsqueeze.validation import check_budget, check_ratio

EMBEDDERS = ("lexical", "hidden")  # how segments and questions are embedded (module docstring)
FOREIGN = "epicache.foreign"  # shared_state key: the queries a compression sees sit after every held token


@register
class EpisodeScorer(Scorer):
    """SnapKV with a foreign observation window: the summed attention of queries placed after every held token
    (an episode's patched prompt), averaged over each KV group and average-pooled."""

    name = "epicache"
    family = "episodic"
    paper = "EpiCache: Episodic KV Cache Management for Long Conversational Question Answering"
    arxiv = "2509.17396"
    kernel: int = Field(5, ge=1)

    def protected(self, length: int) -> int:
        return 0

    def score(self, ctx: LayerContext) -> torch.Tensor:
        if not ctx.shared.get(FOREIGN):
            raise KVSqueezeError(
                "epicache scores a conversation with its episodes' patched prompts: use "
                "kvsqueeze.EpiCache(model, tok, ratio=…).prefill(messages), or --task convqa in the bench"
            )
        return self.foreign_scores(ctx)

    def foreign_scores(self, ctx: LayerContext) -> torch.Tensor:
        q = ctx.require_queries("epicache")
        keys = ctx.keys.repeat_interleave(ctx.groups, dim=1)
        logits = torch.matmul(q, keys.transpose(-1, -2)).float() * ctx.scaling  # [B, Hq, P, L]: every key visible
        logits = logits.masked_fill(~ctx.valid[:, None, None, :], float("-inf"))
        votes = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(dim=2)
        return pool_scores(ctx.per_kv_head(votes), self.kernel, "avg", count_include_pad=True)


# ---- clustering ---------------------------------------------------------------------------------------------------
def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels [N], centroids [k, D])`` of k-means over ``x [N, D]``: k-means++ seeding drawn from a generator
    seeded with ``seed`` (the same input and seed give the same clusters), then Lloyd iterations (batched: one
    distance matrix per iteration; an empty cluster keeps its centroid)."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise KVSqueezeError("kmeans needs points of shape [N, D] with N >= 1")
    x = x.float()
    n = x.shape[0]
    k = max(1, min(k, n))
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = x[first : first + 1]
    for _ in range(1, k):
        d2 = torch.cdist(x, centroids).min(dim=1).values.square()
        weights = d2 if float(d2.sum()) > 0 else torch.ones(n)
        pick = int(torch.multinomial(weights.cpu(), 1, generator=gen))
        centroids = torch.cat([centroids, x[pick : pick + 1]])
    labels = torch.cdist(x, centroids).argmin(dim=1)
    for _ in range(iters):
        onehot = F.one_hot(labels, k).float()  # [N, k]
        sizes = onehot.sum(0)
        means = (onehot.T @ x) / sizes.clamp(min=1)[:, None]
        centroids = torch.where(sizes[:, None] > 0, means, centroids)
        new = torch.cdist(x, centroids).argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels, centroids


def medoids(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``[k]``: for each cluster the index of its member of highest cosine similarity to the centroid."""
    cos = F.normalize(x.float(), dim=-1) @ F.normalize(centroids.float(), dim=-1).T  # [N, k]
    member = F.one_hot(labels, centroids.shape[0]).bool()
    return cos.masked_fill(~member, float("-inf")).argmax(dim=0)


def route(embedding: torch.Tensor, centroids: torch.Tensor) -> int:
    """The episode whose centroid is nearest to ``embedding [D]`` in cosine."""
    cos = F.normalize(centroids.float(), dim=-1) @ F.normalize(embedding.float(), dim=-1)
    return int(cos.argmax())


@dataclass
class LexicalEmbedder:
    """TF-IDF over token ids, fitted on a conversation's segments: ``(1 + log tf) · log(N / df)``, unit-normalized,
    over the token ids the segments hold (a question's other tokens carry no weight)."""

    vocab: torch.Tensor  # [V] the distinct token ids of the segments, sorted
    idf: torch.Tensor  # [V]

    @classmethod
    def fit(cls, token_lists: list[list[int]]) -> LexicalEmbedder:
        if not token_lists or any(len(t) == 0 for t in token_lists):
            raise KVSqueezeError("the lexical embedder needs non-empty token lists")
        vocab = torch.unique(torch.cat([torch.tensor(t, dtype=torch.long) for t in token_lists]))
        empty = cls(vocab, torch.ones(vocab.numel()))
        df = (empty.counts(token_lists) > 0).sum(0).float()
        return cls(vocab, torch.log(len(token_lists) / df))

    def counts(self, token_lists: list[list[int]]) -> torch.Tensor:
        """``[N, V]``: how often each of the vocabulary's token ids occurs in each list."""
        out = torch.zeros(len(token_lists), self.vocab.numel())
        for row, tokens in enumerate(token_lists):  # setup-time loop over the segments
            t = torch.tensor(tokens, dtype=torch.long)
            slot = torch.searchsorted(self.vocab, t).clamp(max=self.vocab.numel() - 1)
            known = self.vocab[slot] == t
            out[row] = torch.bincount(slot[known], minlength=self.vocab.numel()).float()
        return out

    def __call__(self, token_lists: list[list[int]]) -> torch.Tensor:
        tf = self.counts(token_lists)
        weights = torch.where(tf > 0, 1.0 + torch.log(tf.clamp(min=1.0)), 0.0) * self.idf
        return F.normalize(weights, dim=-1)


def embed(model, token_lists: list[list[int]], layer: int | None = None, batch: int = 16) -> torch.Tensor:
    """``[N, hidden]``: each token list run alone through ``model``; the mean hidden state of ``layer`` (default:
    the middle layer) over its tokens."""
    if not token_lists or any(len(t) == 0 for t in token_lists):
        raise KVSqueezeError("embed needs non-empty token lists")
    n_layers = model.config.get_text_config().num_hidden_layers
    layer = n_layers // 2 if layer is None else layer
    if not 0 <= layer <= n_layers:
        raise KVSqueezeError(f"embed_layer must be in [0, {n_layers}], got {layer}")
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(token_lists), batch):
        chunk = token_lists[i : i + batch]
        width = max(len(t) for t in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, t in enumerate(chunk):
            ids[row, : len(t)] = torch.tensor(t)
            mask[row, : len(t)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        h = hidden.hidden_states[layer].float()
        out.append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    return torch.cat(out).cpu()


# ---- layer budgets ------------------------------------------------------------------------------------------------
def layer_sensitivity(model, ratio: float, ids: torch.Tensor, window: int = 32, kernel: int = 5) -> list[float]:
    """Per layer, ``1 − cos`` between the attention output of the last ``window`` queries of ``ids [1, L]`` over
    every key and over the ``ceil((1 − ratio) L)`` keys per head SnapKV keeps (its window included): how much that
    layer's output changes when it alone is evicted at ``ratio``."""
    captured: dict[int, tuple] = {}
    cache = CompressedCache(model, "none")

    def observe(idx, call, keys, values):
        captured[idx] = (call.queries[:, :, -window:].float(), keys.float(), values.float(), call.scaling)

    cache.attention_observer = observe
    cache.prefill(model, ids)
    out = []
    for idx in sorted(captured):
        q, k, v, scaling = captured[idx]
        B, H, L, _ = k.shape
        groups = q.shape[1] // H
        w = min(window, L)
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        logits = (q @ k.transpose(-1, -2)) * scaling  # [B, Hq, w, L]
        causal = torch.arange(L)[None, :] <= torch.arange(L - w, L)[:, None]
        logits = logits.masked_fill(~causal.to(logits.device), float("-inf"))
        probs = torch.softmax(logits, -1)
        full = probs @ v
        votes = probs.sum(2).view(B, H, groups, L).mean(2)  # SnapKV's votes per KV head
        prefix = pool_scores(votes[..., : L - w], kernel, "avg", count_include_pad=True)
        scores = torch.cat([prefix, torch.full_like(votes[..., L - w :], float("inf"))], -1)
        keep_n = max(math.ceil(L * (1.0 - ratio) - 1e-9), w)
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, scores.topk(keep_n, -1).indices, True)
        kept = kept.repeat_interleave(groups, 1)[:, :, None, :]
        evicted = torch.softmax(logits.masked_fill(~kept, float("-inf")), -1) @ v
        cos = F.cosine_similarity(full, evicted, dim=-1)
        out.append(float((1.0 - cos).mean().clamp(min=0.0)))
    return out


def allocate_budgets(sensitivity: list[float], budget: int, alpha: float = 1.0) -> list[int]:
    """Tokens per head for each layer, ``L × budget`` in total, in proportion to ``sensitivity ** alpha`` (largest
    remainders; every layer keeps at least one token)."""
    n = len(sensitivity)
    s = torch.tensor(sensitivity, dtype=torch.float64).clamp(min=1e-12) ** alpha
    total = n * budget
    share = s / s.sum() * (total - n)  # one token per layer is reserved
    base = share.floor()
    rest = int(total - n - base.sum())
    order = torch.argsort(share - base, descending=True, stable=True)
    base[order[:rest]] += 1
    return [int(b) + 1 for b in base]


# ---- the conversation driver --------------------------------------------------------------------------------------
@dataclass
class Episode:
    cache: CompressedCache
    centroid: torch.Tensor  # [hidden]
    medoid: int  # index of the medoid segment
    members: list[int]  # segment indices
    patch: list[int]  # the patched prompt's token ids


class EpiCache:
    """Episodic KV caches of one conversation: ``EpiCache(model, tok, ratio=0.75).prefill(messages)``, then
    ``.answer(question)`` (routed to the nearest episode's cache). ``ratio`` (fraction removed) or ``budget``
    (tokens per KV head, averaged over layers) sets the per-episode budget; see the module docstring for the rest."""

    def __init__(self, model, tokenizer, ratio: float | None = None, budget: int | None = None, episodes: int = 4,
                 block: int = 256, patch: int = 64, segment: int = 2, alpha: float = 1.0, kernel: int = 5,
                 seed: int = 0, embedder: str = "lexical", embed_layer: int | None = None,
                 calibration_tokens: int = 512,
                 sensitivity: list[float] | None = None, max_new_tokens: int = 32):  # fmt: skip
        self.ratio, self.budget = check_ratio(ratio), check_budget(budget)
        if (self.ratio is None) == (self.budget is None):
            raise KVSqueezeError("EpiCache needs either ratio=… (fraction removed) or budget=… (tokens per head)")
        for name, value in (("episodes", episodes), ("block", block), ("patch", patch), ("segment", segment)):
            if not isinstance(value, int) or value < 1:
                raise KVSqueezeError(f"EpiCache {name} must be a positive whole number, got {value!r}")
        if embedder not in EMBEDDERS:
            raise KVSqueezeError(f"EpiCache embedder must be one of {', '.join(EMBEDDERS)}, got {embedder!r}")
        if patch * 2 > block:
            raise KVSqueezeError(f"EpiCache patch ({patch}) must be at most half the block ({block}): raise block")
        self.model, self.tokenizer = model, tokenizer
        self.n_episodes, self.block, self.patch, self.segment = episodes, block, patch, segment
        self.alpha, self.kernel, self.seed, self.embed_layer = alpha, kernel, seed, embed_layer
        self.embedder = embedder
        self.lexical: LexicalEmbedder | None = None
        self.calibration_tokens, self.max_new_tokens = calibration_tokens, max_new_tokens
        self.sensitivity = sensitivity
        self.episodes: list[Episode] = []
        self.layer_budgets: list[int] = []
        self.block_bytes: list[int] = []  # storage of the cache being prefilled, after each block (patch included)
        self.peak_bytes = 0
        self.messages: list[dict] = []
        self.ids: list[int] = []

    # ---- building ----------------------------------------------------------------------------------------------
    def measure_sensitivity(self) -> list[float]:
        if self.sensitivity is None:
            text = "\n\n".join(reversed(essays()[-8:]))  # the calibration text of kvsqueeze.calibration.store
            ids = torch.tensor([encode(self.tokenizer, text)[: self.calibration_tokens]])
            self.sensitivity = layer_sensitivity(self.model, self.ratio or 0.5, ids, self.patch, self.kernel)
        return self.sensitivity

    def prefill(self, messages: list[dict]) -> EpiCache:
        """Cluster the conversation into episodes and build one block-wise compressed cache per episode."""
        per_message = render(self.tokenizer, messages)
        self.messages = list(messages)
        self.ids = [t for m in per_message for t in m]
        n = len(self.ids)
        if n < 2:
            raise KVSqueezeError("EpiCache needs a conversation of at least two tokens")
        budget = self.budget if self.budget is not None else max(1, math.ceil(n * (1.0 - self.ratio) - 1e-9))
        self.layer_budgets = allocate_budgets(self.measure_sensitivity(), budget, self.alpha)
        step = self.segment
        segments = [[t for m in per_message[i : i + step] for t in m] for i in range(0, len(per_message), step)]
        segments = [s for s in segments if s] or [self.ids]
        if self.embedder == "lexical":
            self.lexical = LexicalEmbedder.fit(segments)
        emb = self.embed(segments)
        labels, centroids = kmeans(emb, self.n_episodes, self.seed)
        centres = medoids(emb, labels, centroids)
        self.episodes = []
        for e in range(centroids.shape[0]):
            members = [i for i, label in enumerate(labels.tolist()) if label == e]
            if not members:
                continue
            medoid = int(centres[e])
            patch = segments[medoid][: self.patch]
            cache = self.build(patch)
            self.episodes.append(Episode(cache, centroids[e], medoid, members, patch))
        return self

    def embed(self, token_lists: list[list[int]]) -> torch.Tensor:
        """``[N, D]`` embeddings of ``token_lists`` by this cache's embedder (the lexical one fitted at prefill)."""
        if self.embedder == "lexical":
            return self.lexical(token_lists)
        return embed(self.model, token_lists, self.embed_layer)

    def build(self, patch: list[int]) -> CompressedCache:
        """One episode's cache: the conversation prefilled block-wise, scored after each block by ``patch``."""
        budget = max(self.layer_budgets)
        cache = CompressedCache(self.model, f"epicache:kernel={self.kernel}+blockwise:window=1,block={self.block}",
                                budget=budget, tokenizer=self.tokenizer)  # fmt: skip
        cache.shared_state[DEFERRED] = cache.shared_state[FOREIGN] = True
        patch_ids = torch.tensor([patch], dtype=torch.long)
        chunk = self.block - len(patch)

        def after_block(start: int, end: int) -> None:
            queries, scaling = {}, {}
            last = cache.num_layers - 1

            def observe(idx, call, keys, values):
                queries[idx], scaling[idx] = call.queries.detach(), call.scaling
                if idx == last:
                    self.note_bytes(cache)

            self.note_bytes(cache)
            cache.replay(self.model, patch_ids, observe)
            cache.method.schedule.flush(cache, self.layer_budgets, queries, scaling)

        prefill_blocks(self.model, cache, torch.tensor([self.ids]), chunk, after_block)
        self.peak_bytes = max(self.peak_bytes, cache.peak_bytes)
        return cache

    def note_bytes(self, cache: CompressedCache) -> None:
        size = cache.nbytes()
        self.block_bytes.append(size)
        self.peak_bytes = max(self.peak_bytes, size)

    # ---- answering ---------------------------------------------------------------------------------------------
    def route(self, question: str) -> int:
        """Index of the episode whose centroid is nearest (cosine) to the question's embedding."""
        if not self.episodes:
            raise KVSqueezeError("call EpiCache.prefill(messages) before asking")
        q = self.embed([encode(self.tokenizer, question) or [0]])[0]
        return route(q, torch.stack([e.centroid for e in self.episodes]))

    def question_ids(self, question: str, answer_prefix: str = "") -> list[int]:
        return question_ids(self.tokenizer, self.messages, question, answer_prefix)

    def answer(self, question: str, answer_prefix: str = "", max_new_tokens: int | None = None) -> str:
        """The greedy answer to ``question`` from a fork of its episode's cache (the episode stays as it was)."""
        cache = self.episodes[self.route(question)].cache.fork()
        eos = eos_ids(self.model, self.tokenizer)
        out = greedy(self.model, cache, self.question_ids(question, answer_prefix),
                     max_new_tokens or self.max_new_tokens, eos)  # fmt: skip
        return self.tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True)

    def nbytes(self) -> int:
        """Storage of every episode's cache."""
        return sum(e.cache.nbytes() for e in self.episodes)
