"""``sentencekv``: tokens grouped by sentence, one semantic vector per sentence hot, the sentences whose vectors best
match the query fetched from the cold tier.

Paper: "SentenceKV: Efficient LLM Inference via Sentence-Level Semantic KV Caching", Zhu, Falahati, Yang and
Mohammadi Amiri, arXiv 2504.00970.

- Sentences come from the text: the held token ids are decoded one by one with the cache's tokenizer
  (``CompressedCache(model, "sentencekv", tokenizer=tok)``), and a sentence ends with the token that holds the end
  of a terminator (``.``, ``!``, ``?``, optionally followed by closing quotes or brackets, then whitespace or the
  end of the text; line breaks right after it belong to it) or of a line break (:func:`sentence_units`).
- Each sentence's semantic vector is the mean of its (post-RoPE, as cached) keys, per KV head, kept hot at the
  model's dtype with its token count. Keys and values go to the cold tier (``tier=ram|disk``), one token per slot.
- Per decoding step the sentences are ranked by ``q · vector`` (the largest over the head's query heads and query
  tokens); the best-ranked sentences whose lengths add up to at most the step's token budget are fetched whole and
  attended with the recent window (``residual`` tokens, the cache's full-precision tail) by log-sum-exp.
- Hot budget: ``ratio``/``budget`` give each head's hot tokens; the vectors (one token's key each, plus an int32
  count), the per-token sentence index (int32) and the window are charged first, the rest is what a step may fetch
  (``fetch=`` overrides; with a scorer the kept tokens are all fetched unless ``fetch`` is given).

Deviations: the first ``sinks`` tokens of every head (default 4: the attention sinks) are a unit of their own,
fetched every step first. No token eviction at prefill (the paper keeps the observation window's top tokens within a
budget and offloads the rest of them; here every token goes cold, and ``snapkv+sentencekv`` evicts first when
wanted). The query that ranks sentences is the current step's (the paper averages the queries of the sentence being
generated). Ranking is per KV head by the largest dot product over the head's query heads, not per query head.
Sentences longer than ``max_sentence`` tokens are cut into pieces of at most that many (so that one always fits the
budget). Selection takes the longest prefix of the ranking that fits (a sentence after the first one that does not
fit is not tried). Each step fetches a fixed number of token slots (unused ones masked), which the fetch meter
counts. Tokens decoded after the prefill stay in the hot window. No custom kernels or CPU-GPU pipelines.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from kvsqueeze.core.attention_math import partial_attention
from kvsqueeze.core.storage import KVBlock
from kvsqueeze.core.tiers import ColdStore, paginate, unpaginate
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.retrieval.base import RetrievalCodec
from kvsqueeze.spec import register

TERMINATOR = re.compile(r"[.!?\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*(?:\n+|(?=\s|$))|\n+")


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text, decoded alone (special tokens kept, so every token has its place in the text)."""
    return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def sentence_units(tokenizer, ids: list[int], max_sentence: int) -> np.ndarray:
    """Unit index ``[L]`` (0, 1, …) of every token of ``ids``: the sentences of their text (see the module
    docstring), each cut into pieces of at most ``max_sentence`` tokens."""
    pieces = token_texts(tokenizer, ids)
    L = len(pieces)
    if L == 0:
        return np.zeros(0, dtype=np.int64)
    sizes = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=L)
    owner = np.repeat(np.arange(L), sizes)  # the token each character belongs to
    ends = np.zeros(L, dtype=bool)
    for match in TERMINATOR.finditer("".join(pieces)):
        ends[owner[match.end() - 1]] = True
    ends[-1] = True
    sentence = np.cumsum(ends) - ends  # ends strictly before each token
    start = np.flatnonzero(np.r_[True, sentence[1:] != sentence[:-1]])
    offset = np.arange(L) - start[sentence]
    new = (offset % max_sentence) == 0
    return np.cumsum(new) - 1


class SentenceKVBlock(KVBlock):
    """Hot: ``vectors [B, H, S, D]``, ``sizes [B, H, S]`` (tokens per sentence), ``unit [B, H, P]`` int32 (each
    slot's sentence; ``S`` = empty slot); cold: keys/values ``[B, H, P, 1, D]``."""

    def __init__(self, vectors, sizes, unit, store: ColdStore, lengths, tokens_per_step: int, dim: int,
                 sink: int | None = None):  # fmt: skip
        self.vectors, self.sizes, self.unit, self.store = vectors, sizes, unit, store
        self.lengths, self.tokens_per_step, self.dim, self.sink = lengths.cpu(), tokens_per_step, dim, sink

    def select(self, q: torch.Tensor) -> torch.Tensor:
        """Sentences fetched for ``q [B, H, M, D]``: a mask ``[B, H, S]`` (the best-ranked prefix that fits)."""
        score = (q.float() @ self.vectors.float().transpose(-1, -2)).amax(2)
        score = score.masked_fill(self.sizes == 0, float("-inf"))
        if self.sink is not None:  # the attention sinks: always the first unit fetched
            score[..., self.sink] = float("inf")
        order = score.argsort(-1, descending=True)
        fits = self.sizes.gather(-1, order).cumsum(-1) <= self.tokens_per_step
        fits &= score.gather(-1, order) > float("-inf")
        return torch.zeros_like(fits).scatter(-1, order, fits)

    def slots(self, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token slots of the ``chosen [B, H, S]`` sentences, a fixed ``tokens_per_step`` of them: indices
        ``[B, H, k]`` into the cold arrays and whether each is a real token of a chosen sentence."""
        padded = torch.cat([chosen, chosen.new_zeros(*chosen.shape[:2], 1)], dim=-1)  # slot S: empty
        taken = padded.gather(-1, self.unit.long())  # [B, H, P]
        P = taken.shape[-1]
        order = torch.arange(P, 0, -1, device=taken.device, dtype=torch.float32)  # earlier slots first
        k = min(self.tokens_per_step, P)
        values, index = torch.topk(torch.where(taken, order, 0.0), k, dim=-1, sorted=False)
        return index, values > 0

    def attend(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        index, ok = self.slots(self.select(q))
        keys, values = self.store.take("k", index), self.store.take("v", index)  # [B, H, k, 1, D]
        mask = ok[:, :, None, :]
        return partial_attention(q, keys.flatten(2, 3).to(q.dtype), values.flatten(2, 3).to(q.dtype), scaling, mask)

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        counts = (self.unit < self.sizes.shape[-1]).to(torch.int32)
        keys = unpaginate(self.store.full("k"), counts.to(self.vectors.device))
        values = unpaginate(self.store.full("v"), counts.to(self.vectors.device))
        return keys.to(dtype), values.to(dtype)


@register
class SentenceKVCodec(RetrievalCodec):
    name = "sentencekv"
    paper = "SentenceKV: Efficient LLM Inference via Sentence-Level Semantic KV Caching"
    arxiv = "2504.00970"

    max_sentence: int = 64
    sinks: int = 4  # the first tokens, fetched every step (attention sinks)
    fixed_window = True

    def check(self) -> None:
        super().check()
        if self.max_sentence < 1 or self.sinks < 0:
            raise KVSqueezeError(f"sentencekv: max_sentence must be >= 1 token and sinks >= 0, got {self.max_sentence}")

    def attach(self, host, model) -> None:
        if getattr(host, "tokenizer", None) is None:
            raise KVSqueezeError(
                "sentencekv groups tokens by the sentences of the text: pass the tokenizer, "
                "CompressedCache(model, 'sentencekv', tokenizer=tokenizer)"
            )
        host.follow_tokens(model)  # the live path records the ids of every forward

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        if ctx is None:
            raise KVSqueezeError("sentencekv keeps decoded tokens in its hot window; drop group=")
        if ctx.tokens is None or ctx.tokenizer is None:
            raise KVSqueezeError(
                "sentencekv needs the token ids and the tokenizer: build the cache with "
                "CompressedCache(model, 'sentencekv', tokenizer=tokenizer) and compress through it"
            )
        device, D, Dv = keys.device, keys.shape[-1], values.shape[-1]
        cap = min(self.max_sentence, self.fetch) if self.fetch else self.max_sentence
        key = ("sentencekv_units", cap)  # every layer of one pass has the same text: decoded once per pass
        tokens = ctx.tokens.cpu()
        memo = ctx.scratch.get(key)
        if memo is None or not torch.equal(memo[0], tokens):
            units = torch.stack([torch.from_numpy(sentence_units(ctx.tokenizer, row.tolist(), cap)) for row in tokens])
            memo = ctx.scratch[key] = (tokens, units)  # [B, L], on the host (prefill only)
        units = memo[1]
        B, H, _ = ctx.stored.shape
        flat = units.to(device)[:, None, :].expand(B, H, -1)[ctx.stored]  # [N] in the keys' order
        kp, counts = paginate(keys, lengths, 1)  # [B, H, P, 1, D]
        vp, _ = paginate(values, lengths, 1)
        present = counts > 0  # [B, H, P]
        unit = paginate(flat[:, None], lengths, 1)[0][..., 0, 0]  # [B, H, P]
        S = int(flat.max()) + 1 if flat.numel() else 1
        sink = None
        if self.sinks:  # the first stored tokens of every head: a unit of their own, always fetched
            sink, S = S, S + 1
            unit = unit.masked_fill(torch.arange(unit.shape[-1], device=device) < self.sinks, sink)
        unit = unit.masked_fill(~present, S)
        index = unit.clamp(max=S - 1)
        sizes = torch.zeros(B, H, S, dtype=torch.int32, device=device).scatter_add_(-1, index, present.int())
        sums = torch.zeros(B, H, S, D, dtype=torch.float32, device=device)
        sums.scatter_add_(2, index[..., None].expand(-1, -1, -1, D), kp[..., 0, :].float() * present[..., None])
        vectors = (sums / sizes.clamp(min=1)[..., None]).to(keys.dtype)

        e = keys.element_size()
        P = unit.shape[-1]
        overhead = (S * (D * e + 4) + P * 4) / ((D + Dv) * e) + self.residual
        fetch = self.fetch_tokens(ctx, overhead, cap, "the sentence vectors and the window")
        per_step = P if fetch is None else max(min(fetch, P), 1)
        store = self.store_for(device)
        store.put("k", kp)
        store.put("v", vp)
        return SentenceKVBlock(vectors, sizes, unit.to(torch.int32).contiguous(), store, lengths, per_step, D, sink)
