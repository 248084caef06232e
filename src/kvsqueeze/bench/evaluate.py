"""Evaluate one sample for several (method, ratio) cells: one prefill, then one cache per cell.

``SampleEvaluator`` tokenizes a sample, runs the exact prefill once (lazily, only if a cell needs it), keeps the
full cache's reference logits for fidelity numbers, and returns one result dict per cell. ``run_all`` decodes the
caches of QA and continuation cells together in batched forward passes (``kvsqueeze.bench.batch``): the same
rows, a fraction of the time. Speed samples run the live path instead (their point is to time the prefill with
compression inside it), as do longgen samples (``kvsqueeze.schedules_eval.longgen``) and multiturn samples.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass

import torch

from kvsqueeze.bench import scoring
from kvsqueeze.bench.batch import forward_many, greedy_many
from kvsqueeze.bench.capture import Decoded, Prefill, build_cache, capture_prefill, eos_ids, forward, greedy
from kvsqueeze.bench.tasks.base import Question, Sample
from kvsqueeze.bench.text import continuation_ids, encode
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.spec import parse_method

_SPLIT = "\x00KVSQUEEZE_CONTEXT_END\x00"
BATCH_ROWS = 24  # at most this many caches per batched forward pass (bounds the memory held at once)


def _attempt(run, cell) -> dict | Exception:
    try:
        return run(cell)
    except Exception as exc:
        return exc


@dataclass(frozen=True)
class Cell:
    method: str  # normalized spec ("none" = full cache)
    ratio: float | None


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([encode(tokenizer, text)], dtype=torch.long)


def _gold_ids(tokenizer, prompt_end: str, q: Question) -> torch.Tensor:
    """The gold answer's token ids as they follow the prompt, which ends with the answer prefix."""
    return torch.tensor([continuation_ids(tokenizer, prompt_end, q.gold)], dtype=torch.long)


def _chat(tokenizer, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = ""
    for m in messages:
        text += f"{m['content']}\n\n"
    return text + "Answer:"


def split_prompt(tokenizer, context: str, q: Question) -> tuple[str, str]:
    """The chat-formatted prompt as text, split where the context ends; the question part ends with the answer
    prefix, so generation continues it."""
    text = _chat(tokenizer, [{"role": "user", "content": f"{context}{_SPLIT}\n\n{q.text}"}])
    head, tail = text.split(_SPLIT)
    return head, tail + (" " if not getattr(tokenizer, "chat_template", None) else "") + q.answer_prefix


def qa_prompt(tokenizer, context: str, q: Question) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context_ids, question_ids)`` of :func:`split_prompt`."""
    head, tail = split_prompt(tokenizer, context, q)
    return _ids(tokenizer, head), _ids(tokenizer, tail)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class _RssPeak:
    """Peak resident set size of this process while the block runs (Linux /proc; 0 elsewhere)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


class SampleEvaluator:
    """Everything one sample needs, shared across its cells."""

    def __init__(self, model, tokenizer, sample: Sample, query_aware: bool):
        self.model, self.tokenizer, self.sample = model, tokenizer, sample
        self.query_aware = query_aware and sample.kind == "qa"
        self.eos = eos_ids(model, tokenizer)
        self._prefill: Prefill | None = None
        self._reference: torch.Tensor | None = None
        self._longgen_full: dict | None = None
        if sample.kind in ("qa", "speed", "longgen"):
            q = sample.questions[0]
            self.context_ids, self.question_ids = qa_prompt(tokenizer, sample.context, q)
            self.gold_ids = _gold_ids(tokenizer, split_prompt(tokenizer, sample.context, q)[1], q)
        elif sample.kind == "continuation":
            self.context_ids = torch.tensor([list(tokenizer.encode(sample.context))], dtype=torch.long)
            self.question_ids = torch.zeros(1, 0, dtype=torch.long)
            self.gold_ids = _ids(tokenizer, sample.continuation)
        else:  # multiturn: the context part of the first turn's prompt
            self.head, _ = split_prompt(tokenizer, sample.context, sample.questions[0])
            self.context_ids = _ids(tokenizer, self.head)
            self.question_ids = torch.zeros(1, 0, dtype=torch.long)
            self.gold_ids = torch.zeros(1, 0, dtype=torch.long)

    # ---- shared work ---------------------------------------------------------------------------------------
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

    def _first_logits(self, cache: CompressedCache) -> torch.Tensor:
        if self.query_aware or self.question_ids.shape[-1] == 0:
            return self.prefill.last_logits
        return forward(self.model, cache, self.question_ids, keep=1)[-1]

    def _gold_logits(self, cache: CompressedCache, first: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        """Logits predicting each gold token (teacher forcing on a fork: ``cache`` stays as it was)."""
        if gold.shape[-1] <= 1:
            return first[None]
        rest = forward(self.model, cache.fork(), gold[:, :-1])
        return torch.cat([first[None], rest], dim=0)

    def reference(self) -> torch.Tensor:
        """The full cache's gold (or continuation) logits, for KL and top-1 agreement."""
        if self._reference is None:
            cache = build_cache(self.model, self.prefill, "none", None)
            self._reference = self._gold_logits(cache, self._first_logits(cache), self.gold_ids)
        return self._reference

    # ---- one cell ----------------------------------------------------------------------------------------------
    def run(self, cell: Cell) -> dict:
        start = time.perf_counter()
        if self.sample.kind == "speed":
            result = self._speed(cell)
        elif self.sample.kind == "longgen":
            result = self._longgen(cell)
        else:
            cache = build_cache(self.model, self.prefill, cell.method, cell.ratio)
            result = self._cache_fields(cache)
            if self.sample.kind == "qa":
                result.update(self._qa(cache))
            elif self.sample.kind == "continuation":
                result.update(self._continuation(cache))
            else:
                result.update(self._multiturn(cache))
        result["bytes_per_token"] = result["cache_bytes"] / max(result["tokens_compressed"], 1)
        result["cell_seconds"] = time.perf_counter() - start
        return result

    def _cache_fields(self, cache: CompressedCache) -> dict:
        stats = cache.stats()
        return {
            "compression_seconds": cache.compression_seconds,
            "cache_bytes": stats["cache_bytes"],
            "full_bytes": stats["full_cache_bytes"],
            "tokens_compressed": stats["tokens_seen"],
            "tokens_kept_mean": stats["tokens_kept_mean"],
            "prefill_seconds": self.prefill.seconds,
            "prompt_tokens": int(self.context_ids.shape[-1] + self.question_ids.shape[-1]),
        }

    def _done(self, q: Question):
        def done(tokens: list[int]) -> bool:  # the score can no longer change once every answer is out
            return scoring.all_found(self.tokenizer.decode(tokens, skip_special_tokens=True), q.answers)

        if q.metric not in ("all", "part"):  # F1, ROUGE …: more text changes the score; decode as the benchmark does
            return lambda tokens: False
        return done

    def _qa_row(self, gold: torch.Tensor, out: Decoded) -> dict:
        q = self.sample.questions[0]
        scores = scoring.gold_loglik(gold, self.gold_ids[0])
        scores.update({f"{k}_gold": v for k, v in scoring.fidelity(self.reference(), gold).items()})
        text = self.tokenizer.decode(out.tokens, skip_special_tokens=True).strip()
        scores["score"] = scoring.match(text, q.answers, q.metric, q.choices)
        return {
            "scores": scores,
            "output": text,
            "expected": list(q.answers),
            "new_tokens": len(out.tokens),
            "decode_seconds": out.seconds,
            "decode_tokens_per_second": out.tokens_per_second,
        }

    def _qa(self, cache: CompressedCache) -> dict:
        q = self.sample.questions[0]
        first = self._first_logits(cache)
        gold = self._gold_logits(cache, first, self.gold_ids)
        out = greedy(self.model, cache, first, q.max_new_tokens, self.eos, stop=self._done(q))
        return self._qa_row(gold, out)

    def _continuation_row(self, logits: torch.Tensor) -> dict:
        targets = self.gold_ids[0]
        scores = {**scoring.perplexity(logits, targets), **scoring.fidelity(self.reference(), logits)}
        scores["score"] = scores["ppl"] if self.sample.task == "ppl" else scores["kl"]
        return {"scores": scores, "continuation_tokens": int(targets.numel())}

    def _continuation(self, cache: CompressedCache) -> dict:
        return self._continuation_row(self._gold_logits(cache, self._first_logits(cache), self.gold_ids))

    # ---- all cells of the sample at once -------------------------------------------------------------------
    def run_all(self, cells: list[Cell]) -> list[dict | Exception]:
        """One result (or the exception it raised) per cell. QA and continuation cells are built one by one from
        the captured prefill, then decoded together, ``BATCH_ROWS`` caches per batched forward pass; if a batch
        fails, its cells run one by one so that only the failing cell records the error."""
        if self.sample.kind not in ("qa", "continuation") or len(cells) < 2 or BATCH_ROWS < 2:
            return [_attempt(self.run, cell) for cell in cells]
        results: list[dict | Exception | None] = [None] * len(cells)
        built: list[tuple[int, Cell, CompressedCache, float]] = []
        for i, cell in enumerate(cells):
            start = time.perf_counter()
            try:
                cache = build_cache(self.model, self.prefill, cell.method, cell.ratio)
            except Exception as exc:
                results[i] = exc
                continue
            built.append((i, cell, cache, time.perf_counter() - start))
        size = math.ceil(len(built) / max(math.ceil(len(built) / BATCH_ROWS), 1))  # balanced batches
        for at in range(0, len(built), size):
            chunk = built[at : at + size]
            try:
                rows = self._batched([cache for _, _, cache, _ in chunk])
            except Exception:
                rows = [_attempt(self.run, cell) for _, cell, _, _ in chunk]
            else:
                for row, (_, _, _, build_s) in zip(rows, chunk, strict=True):
                    row["cell_seconds"] += build_s
            for (i, _, _, _), row in zip(chunk, rows, strict=True):
                results[i] = row
        return results

    def _batched(self, caches: list[CompressedCache]) -> list[dict]:
        start = time.perf_counter()
        fields = [self._cache_fields(cache) for cache in caches]
        n = len(caches)
        if self.query_aware or self.question_ids.shape[-1] == 0:
            firsts = [self.prefill.last_logits] * n
        else:
            firsts = list(forward_many(self.model, caches, self.question_ids, keep=1)[:, -1])
        gold_ids = self.gold_ids
        if gold_ids.shape[-1] <= 1:
            golds = [f[None] for f in firsts]
        else:
            forks = [cache.fork() for cache in caches] if self.sample.kind == "qa" else caches
            rest = forward_many(self.model, forks, gold_ids[:, :-1])
            golds = [torch.cat([f[None], r], dim=0) for f, r in zip(firsts, rest, strict=True)]
        if self.sample.kind == "continuation":
            rows = [self._continuation_row(g) for g in golds]
        else:
            q = self.sample.questions[0]
            outs = greedy_many(self.model, caches, firsts, [q.max_new_tokens] * n, self.eos, [self._done(q)] * n)
            rows = [self._qa_row(g, o) for g, o in zip(golds, outs, strict=True)]
            for row in rows:  # decode time is shared by the batch: its tok/s is no per-method speed (see `speed`)
                row["decode_tokens_per_second"] = None
        shared = (time.perf_counter() - start) / n
        for row, extra in zip(rows, fields, strict=True):
            row.update(extra)
            row["bytes_per_token"] = row["cache_bytes"] / max(row["tokens_compressed"], 1)
            row["cell_seconds"] = shared
            row["batched_rows"] = n
        return rows

    def _multiturn(self, cache: CompressedCache) -> dict:
        tok = self.tokenizer
        messages: list[dict] = []
        in_cache = self.head
        turns, decode_s, steps, outputs = [], 0.0, 0, []
        for t, q in enumerate(self.sample.questions):
            user = f"{self.sample.context}\n\n{q.text}" if t == 0 else q.text
            messages.append({"role": "user", "content": user})
            text = _chat(tok, messages) + (" " if not getattr(tok, "chat_template", None) else "") + q.answer_prefix
            new = text[len(in_cache) :] if text.startswith(in_cache) else text[_common_prefix(text, in_cache) :]
            first = forward(self.model, cache, _ids(tok, new), keep=1)[-1]
            gold_ids = _gold_ids(tok, new, q)
            ll = scoring.gold_loglik(self._gold_logits(cache, first, gold_ids), gold_ids[0])
            out = greedy(self.model, cache, first, q.max_new_tokens, self.eos)
            answer_tokens = [x for x in out.tokens if x not in self.eos]
            answer = tok.decode(answer_tokens, skip_special_tokens=True)
            if out.tokens and out.tokens[-1] not in self.eos:  # the last token is not in the cache yet
                forward(self.model, cache, torch.tensor([[out.tokens[-1]]]), keep=1)
            in_cache = text + answer
            messages.append({"role": "assistant", "content": q.answer_prefix + answer})
            turns.append({"score": scoring.match(answer, q.answers, q.metric, q.choices), **ll})
            outputs.append(answer.strip())
            decode_s += out.seconds
            steps += out.steps
        scores = {k: sum(x[k] for x in turns) / len(turns) for k in ("score", "loglik", "loglik_per_token")}
        scores.update({f"turn{i + 1}": x["score"] for i, x in enumerate(turns)})
        return {
            "scores": scores,
            "output": outputs,
            "expected": [list(q.answers) for q in self.sample.questions],
            "decode_seconds": decode_s,
            "decode_tokens_per_second": steps / decode_s if decode_s > 0 else 0.0,
        }

    def _longgen(self, cell: Cell) -> dict:
        """Teacher-force the full cache's greedy N-token generation under ``cell`` (schedules_eval.longgen)."""
        from kvsqueeze.schedules_eval import longgen

        n_tokens = self.sample.questions[0].max_new_tokens
        ids = torch.cat([self.context_ids, self.question_ids], dim=-1).to(self.model.device)
        if self._longgen_full is None:  # the full cache's run carries the reference every other cell reuses
            self._longgen_full = longgen(self.model, self.tokenizer, "none", ids, n_tokens=n_tokens)
        if cell.method == "none":
            res = self._longgen_full
        else:
            ref = self._longgen_full["reference"]
            res = longgen(self.model, self.tokenizer, cell.method, ids, n_tokens=n_tokens, ratio=cell.ratio,
                          reference=ref)  # fmt: skip
        n, prompt = int(res["generated_tokens"]), int(res["prompt_tokens"])
        top1 = res["top1_agreement"]
        return {
            "scores": {"score": top1, "top1": top1, "kl": res["kl_mean"], "kl_max": res["kl_max"]},
            "cache_bytes": res["cache_bytes"],
            "full_bytes": res["full_cache_bytes"],
            "tokens_compressed": prompt + n - 1,  # what the full cache holds at the end
            "tokens_kept_mean": res["tokens_held_end"],
            "prompt_tokens": prompt,
            "generated_tokens": n,
            "decode_tokens_per_second": res["decode_tok_s"],
            "full_decode_tokens_per_second": res["full_decode_tok_s"],
            "decode_vs_full": res["relative_speed"],
        }

    def _speed(self, cell: Cell) -> dict:
        """Live path: prefill with compression inside the forward pass, then exactly max_new_tokens greedy steps."""
        q = self.sample.questions[0]
        ids = torch.cat([self.context_ids, self.question_ids], dim=-1)
        with _RssPeak() as rss:
            cache = CompressedCache(self.model, parse_method(cell.method), ratio=cell.ratio)
            start = time.perf_counter()
            with torch.no_grad():
                first = forward(self.model, cache, ids, keep=1)[-1]
            prefill = time.perf_counter() - start
            out = greedy(self.model, cache, first, q.max_new_tokens, eos=set())
        stats = cache.stats()
        text = self.tokenizer.decode(out.tokens, skip_special_tokens=True)
        return {
            "scores": {"score": scoring.match(text, q.answers, q.metric, q.choices)},
            "output": text.strip(),
            "expected": list(q.answers),
            "prefill_seconds": prefill,
            "compression_seconds": cache.compression_seconds,
            "decode_seconds": out.seconds,
            "decode_tokens_per_second": out.tokens_per_second,
            "new_tokens": len(out.tokens),
            "cache_bytes": stats["cache_bytes"],
            "full_bytes": stats["full_cache_bytes"],
            "tokens_compressed": int(ids.shape[-1]),
            "tokens_kept_mean": stats["tokens_kept_mean"],
            "prompt_tokens": int(ids.shape[-1]),
            "peak_rss_bytes": rss.peak,
            "rss_delta_bytes": rss.peak - rss.base,
        }
