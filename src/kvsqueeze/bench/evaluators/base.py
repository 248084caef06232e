"""What every evaluator shares: the cell, the sample's one exact prefill (captured lazily), the full cache's
reference logits, and the fields every result row carries."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.bench import scoring
from kvsqueeze.bench.capture import Prefill, build_cache, capture_prefill, eos_ids, forward
from kvsqueeze.bench.tasks.base import Question, Sample
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.prompts import continuation_ids


@dataclass(frozen=True)
class Cell:
    method: str  # normalized spec ("none" = full cache)
    ratio: float | None


def attempt(run, cell: Cell) -> dict | Exception:
    """``run(cell)``, or the exception it raised (recorded as that cell's error, the sweep goes on)."""
    try:
        return run(cell)
    except Exception as exc:
        return exc


def tier_fields(cache: CompressedCache) -> dict:
    """Where the cache's bytes live (:mod:`kvsqueeze.core.tiers`): ``hot_bytes`` (what attention reads in place),
    ``cold_bytes`` (a retrieval method's cold tier, RAM or disk). A method without a cold tier: hot = every byte,
    cold 0. Read right after compression, before anything is decoded."""
    return {"hot_bytes": cache.nbytes(tier="hot"), "cold_bytes": cache.nbytes(tier="cold")}


def fetched_per_token(*caches: CompressedCache) -> float:
    """Bytes brought from cold tiers per token decoded over compressed storage, over ``caches`` together (a session
    of forks: each fork meters its own fetches); 0 for methods without a cold tier."""
    fetched = sum(c.fetch_meter.fetched_bytes for c in caches)
    tokens = sum(c.fetch_meter.tokens for c in caches)
    return fetched / tokens if tokens else 0.0


def fetch_fields(*caches: CompressedCache) -> dict:
    """``fetched_bytes_per_token`` and ``fetched_bytes_per_step`` (per forward pass: one step's working set) over
    ``caches`` together."""
    fetched = sum(c.fetch_meter.fetched_bytes for c in caches)
    steps = sum(c.fetch_meter.steps for c in caches)
    return {"fetched_bytes_per_token": fetched_per_token(*caches),
            "fetched_bytes_per_step": fetched / steps if steps else 0.0}  # fmt: skip


def gold_ids(tokenizer, prompt_end: str, q: Question) -> torch.Tensor:
    """The gold answer's token ids as they follow the prompt, which ends with the answer prefix."""
    return torch.tensor([continuation_ids(tokenizer, prompt_end, q.gold)], dtype=torch.long)


@dataclass
class Session:
    """The turns of a multi-turn or multi-request session, gathered into one result row."""

    turns: list[dict]
    outputs: list[str]
    decode_seconds: float = 0.0
    steps: int = 0

    def add(self, answer: str, q: Question, loglik: dict, out) -> None:
        self.turns.append({"score": scoring.match(answer, q.answers, q.metric, q.choices), **loglik})
        self.outputs.append(answer.strip())
        self.decode_seconds += out.seconds
        self.steps += out.steps

    def row(self, sample: Sample) -> dict:
        """Mean scores over turns, each turn's score (``turn1 …``), outputs and decode speed."""
        n = len(self.turns)
        scores = {k: sum(x[k] for x in self.turns) / n for k in ("score", "loglik", "loglik_per_token")}
        scores.update({f"turn{i + 1}": x["score"] for i, x in enumerate(self.turns)})
        return {
            "scores": scores,
            "output": self.outputs,
            "expected": [list(q.answers) for q in sample.questions],
            "decode_seconds": self.decode_seconds,
            "decode_tokens_per_second": self.steps / self.decode_seconds if self.decode_seconds > 0 else 0.0,
        }


class Evaluator:
    """One sample, shared across its cells: ``context_ids`` (what is compressed), ``question_ids`` (appended after
    compression, query-agnostic), ``gold_ids`` (teacher-forced for log-likelihood and fidelity)."""

    kind: ClassVar[str] = ""

    def __init__(self, model, tokenizer, sample: Sample, query_aware: bool):
        self.model, self.tokenizer, self.sample = model, tokenizer, sample
        self.query_aware = query_aware and sample.kind == "qa"
        self.eos = eos_ids(model, tokenizer)
        self._prefill: Prefill | None = None
        self._reference: torch.Tensor | None = None
        self.context_ids = self.question_ids = self.gold_ids = torch.zeros(1, 0, dtype=torch.long)

    # ---- shared work -----------------------------------------------------------------------------------------
    @property
    def compressed_ids(self) -> torch.Tensor:
        if self.query_aware:
            return torch.cat([self.context_ids, self.question_ids], dim=-1)
        return self.context_ids

    @property
    def prefill(self) -> Prefill:
        if self._prefill is None:
            self._prefill = capture_prefill(self.model, self.compressed_ids)
        return self._prefill

    def answer_text(self, tokens: list[int]) -> str:
        """A greedy answer's text (end-of-sequence tokens dropped)."""
        return self.tokenizer.decode([t for t in tokens if t not in self.eos], skip_special_tokens=True)

    def first_logits(self, cache: CompressedCache) -> torch.Tensor:
        """Logits of the first answer token: the prefill's (query-aware) or after appending the question."""
        if self.query_aware or self.question_ids.shape[-1] == 0:
            return self.prefill.last_logits
        return forward(self.model, cache, self.question_ids, keep=1)[-1]

    def gold_logits(self, cache: CompressedCache, first: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        """Logits predicting each gold token (teacher forcing on a fork: ``cache`` stays as it was)."""
        if gold.shape[-1] <= 1:
            return first[None]
        rest = forward(self.model, cache.fork(), gold[:, :-1])
        return torch.cat([first[None], rest], dim=0)

    def reference(self) -> torch.Tensor:
        """The full cache's gold (or continuation) logits, for KL and top-1 agreement."""
        if self._reference is None:
            cache = build_cache(self.model, self.prefill, "none", None)
            self._reference = self.gold_logits(cache, self.first_logits(cache), self.gold_ids)
        return self._reference

    def cache_fields(self, cache: CompressedCache) -> dict:
        stats = cache.stats()
        return {
            "compression_seconds": cache.compression_seconds,
            "cache_bytes": stats["cache_bytes"],
            "full_bytes": stats["full_cache_bytes"],
            "peak_cache_bytes": stats["peak_cache_bytes"],
            "tokens_compressed": stats["tokens_seen"],
            "tokens_kept_mean": stats["tokens_kept_mean"],
            "prefill_seconds": self.prefill.seconds,
            "prompt_tokens": int(self.context_ids.shape[-1] + self.question_ids.shape[-1]),
            **tier_fields(cache),
        }

    # ---- cells -------------------------------------------------------------------------------------------------
    def evaluate(self, cell: Cell) -> dict:
        """The result fields of one cell (subclasses)."""
        cache = build_cache(self.model, self.prefill, cell.method, cell.ratio, self.tokenizer)
        fields = self.cache_fields(cache)  # at rest, before decoding
        row = {**fields, **self.decode(cache)}
        if "fetched_bytes_per_token" not in row:  # sessions of forks set their own
            row.update(fetch_fields(cache))
        return row

    def decode(self, cache: CompressedCache) -> dict:
        raise NotImplementedError

    def run(self, cell: Cell) -> dict:
        start = time.perf_counter()
        result = self.evaluate(cell)
        result["bytes_per_token"] = result["cache_bytes"] / max(result["tokens_compressed"], 1)
        result["cell_seconds"] = time.perf_counter() - start
        return result

    def run_all(self, cells: list[Cell]) -> list[dict | Exception]:
        """One result (or the exception it raised) per cell."""
        return [attempt(self.run, cell) for cell in cells]
