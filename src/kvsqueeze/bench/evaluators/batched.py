"""Evaluators whose cells decode together: every cell's cache is built from the sample's one captured prefill,
then the caches decode as the rows of batched forward passes (``kvsqueeze.bench.batch``): the same rows, a
fraction of the time."""

from __future__ import annotations

import math
import time

import torch

from kvsqueeze.bench.batch import forward_many
from kvsqueeze.bench.capture import build_cache
from kvsqueeze.bench.evaluators.base import Cell, Evaluator, Session, attempt, fetch_fields
from kvsqueeze.core.cache import CompressedCache


def session_rows(sample, sessions: list[Session], caches_of_rows: list[list[CompressedCache]]) -> list[dict]:
    """One result row per session; the decode time of a batch of several rows is shared, so no tok/s."""
    rows = []
    for session, caches in zip(sessions, caches_of_rows, strict=True):
        row = {**session.row(sample), **fetch_fields(*caches)}
        if len(sessions) > 1:
            row["decode_tokens_per_second"] = None
        rows.append(row)
    return rows


def gold_logits_many(model, caches: list[CompressedCache], firsts: torch.Tensor, gold: torch.Tensor, fork: bool):
    """Each row's logits predicting each gold token (``[B, len(gold), V]``); teacher forcing runs on forks of
    ``caches`` if ``fork``, else it appends the gold to them."""
    if gold.shape[-1] <= 1 and fork:
        return firsts[:, None]
    targets = [c.fork() for c in caches] if fork else caches
    rest = forward_many(model, targets, gold[:, :-1] if fork else gold)
    return torch.cat([firsts[:, None], rest[:, : gold.shape[-1] - 1]], dim=1)


class BatchedEvaluator(Evaluator):
    """Subclasses turn each row's gold logits (and their own decoding) into result rows: :meth:`rows`."""

    fork_for_gold = True  # teacher-force the gold on forks (the caches decode afterwards)
    batch_rows = 24  # at most this many caches per batched forward pass (bounds the memory held at once)

    def rows(self, caches: list[CompressedCache], firsts: list[torch.Tensor], golds: list[torch.Tensor]) -> list[dict]:
        raise NotImplementedError

    def decode(self, cache: CompressedCache) -> dict:
        first = self.first_logits(cache)
        return self.rows([cache], [first], [self.gold_logits(cache, first, self.gold_ids)])[0]

    def run_all(self, cells: list[Cell]) -> list[dict | Exception]:
        """Cells are built one by one from the captured prefill, then decoded together, ``batch_rows`` caches per
        batched forward pass; if a batch fails, its cells run one by one so that only the failing cell records the
        error."""
        if len(cells) < 2 or self.batch_rows < 2:
            return super().run_all(cells)
        results: list[dict | Exception | None] = [None] * len(cells)
        built: list[tuple[int, Cell, CompressedCache, float]] = []
        for i, cell in enumerate(cells):
            start = time.perf_counter()
            try:
                cache = build_cache(self.model, self.prefill, cell.method, cell.ratio, self.tokenizer)
            except Exception as exc:
                results[i] = exc
                continue
            built.append((i, cell, cache, time.perf_counter() - start))
        size = math.ceil(len(built) / max(math.ceil(len(built) / self.batch_rows), 1))  # balanced batches
        for at in range(0, len(built), size):
            chunk = built[at : at + size]
            try:
                rows = self.batched([cache for _, _, cache, _ in chunk])
            except Exception:
                rows = [attempt(self.run, cell) for _, cell, _, _ in chunk]
            else:
                for row, (_, _, _, build_s) in zip(rows, chunk, strict=True):
                    row["cell_seconds"] += build_s
            for (i, _, _, _), row in zip(chunk, rows, strict=True):
                results[i] = row
        return results

    def decode_many(self, caches: list[CompressedCache]) -> list[dict]:
        """The decoding fields of every cache, decoded together: the question appended, the gold teacher-forced,
        then :meth:`rows` (subclasses with sessions of several questions override it)."""
        n = len(caches)
        if self.query_aware or self.question_ids.shape[-1] == 0:
            firsts = [self.prefill.last_logits] * n
        else:
            firsts = list(forward_many(self.model, caches, self.question_ids, keep=1)[:, -1])
        if self.gold_ids.shape[-1] <= 1:
            golds = [f[None] for f in firsts]
        else:
            forks = [cache.fork() for cache in caches] if self.fork_for_gold else caches
            rest = forward_many(self.model, forks, self.gold_ids[:, :-1])
            golds = [torch.cat([f[None], r], dim=0) for f, r in zip(firsts, rest, strict=True)]
        return self.rows(caches, firsts, golds)

    def batched(self, caches: list[CompressedCache]) -> list[dict]:
        start = time.perf_counter()
        fields = [self.cache_fields(cache) for cache in caches]
        n = len(caches)
        rows = self.decode_many(caches)
        shared = (time.perf_counter() - start) / n
        for row, extra, cache in zip(rows, fields, caches, strict=True):
            row.update(extra)
            if "fetched_bytes_per_token" not in row:  # sessions of forks set their own
                row.update(fetch_fields(cache))  # the question and the answer, not the gold
            row["bytes_per_token"] = row["cache_bytes"] / max(row["tokens_compressed"], 1)
            row["cell_seconds"] = shared
            row["batched_rows"] = n
        return rows
