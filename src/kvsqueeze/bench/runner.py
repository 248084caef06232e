"""The sweep: every sample × (full cache + method × ratio), one captured prefill per sample, rows on disk.

- A *cell* is (task, sample, method, ratio) under one run configuration (model, dtype, seed, query mode); its key
  identifies the row in ``results.jsonl``. With ``resume`` (default) finished cells (ok or failed) are skipped; a
  sample whose cells are all finished does no model work, and the model is loaded only if some cell is pending.
- Rows are appended one line at a time (write, flush, fsync), so Ctrl-C or a crash keeps every finished row and
  a torn last line is ignored on reading.
- A cell that raises is recorded with ``status: "error"`` and its message; the sweep goes on.
- Methods that do not evict (a codec alone, e.g. ``kivi``) and methods whose decoding schedule fixes its own
  budget (``h2o+interval:every=16,budget=256``) run once per sample with ``ratio: null``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from kvsqueeze.bench.evaluate import Cell, SampleEvaluator
from kvsqueeze.bench.tasks import TaskSpec, default_lengths, generate
from kvsqueeze.bench.tasks.base import Sample
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import parse_method

RESULTS = "results.jsonl"


# ---- parsing user input (before any model work) ---------------------------------------------------------------
def parse_methods(text: str) -> list[str]:
    """Comma-separated method specs (parameters may contain commas: ``snapkv:window=32,kernel=5,h2o``),
    each validated and normalized; ``none``/``full`` is implied and dropped."""
    pieces: list[str] = []
    for piece in text.split(","):
        piece = piece.strip()
        if not piece:
            continue
        last = pieces[-1].split("+")[-1] if pieces else ""
        if "=" in piece and ":" not in piece and ":" in last:
            pieces[-1] += "," + piece
        else:
            pieces.append(piece)
    specs: list[str] = []
    for piece in pieces:
        if piece.lower() in ("full", "none"):
            continue
        spec = parse_method(piece).spec()
        if spec not in specs:
            specs.append(spec)
    return specs


def parse_ratios(text: str) -> list[float]:
    ratios = []
    for piece in text.split(","):
        piece = piece.strip()
        if not piece:
            continue
        try:
            value = float(piece)
        except ValueError:
            raise KVSqueezeError(f"bad ratio {piece!r}; give fractions removed in (0, 1), e.g. 0.25,0.5,0.75") from None
        if not 0.0 < value < 1.0:
            raise KVSqueezeError(f"ratio {value} is outside (0, 1); a ratio is the fraction of tokens removed")
        if value not in ratios:
            ratios.append(value)
    if not ratios:
        raise KVSqueezeError("no ratio given; e.g. --ratios 0.25,0.5,0.75")
    return ratios


def parse_lengths(text: str | None) -> list[int] | None:
    if text is None or not text.strip():
        return None
    out = []
    for piece in text.split(","):
        try:
            value = int(piece.strip())
        except ValueError:
            raise KVSqueezeError(f"bad context length {piece!r}; give token counts, e.g. 1024,2048") from None
        if value < 256:
            raise KVSqueezeError(f"context length {value} is too short; use at least 256 tokens")
        out.append(value)
    return out


@dataclass
class SweepConfig:
    tasks: list[TaskSpec]
    methods: list[str]
    ratios: list[float]
    samples: int = 20
    lengths: list[int] | None = None  # None: each task's default
    model: str | None = None
    dtype: str = "float32"
    seed: int = 0
    query_aware: bool = False
    out: Path = Path("runs/bench")
    resume: bool = True

    def cells(self) -> list[Cell]:
        cells = [Cell("none", None)]
        for spec in self.methods:
            method = parse_method(spec)
            if method.evicts and getattr(method.schedule, "budget", None) is None:
                cells += [Cell(spec, r) for r in self.ratios]
            else:
                cells.append(Cell(spec, None))
        return cells

    def lengths_for(self, task: TaskSpec) -> list[int]:
        if task.name == "file":
            return [0]
        return list(self.lengths) if self.lengths else list(default_lengths(task))

    @property
    def mode(self) -> str:
        return "query-aware" if self.query_aware else "query-agnostic"

    def key(self, sample: Sample, cell: Cell) -> str:
        return json.dumps(
            [
                sample.task,
                sample.id,
                cell.method,
                cell.ratio,
                self.model or "embedded",
                self.dtype,
                self.seed,
                self.mode,
            ]
        )


def check_budgets(config: SweepConfig) -> None:
    """Reject (before any model work) a method × ratio whose budget at a requested context length is smaller than
    the tokens the method always keeps (SnapKV's window, StreamingLLM's sinks …). File datasets are not checked
    (their lengths are per sample); a cell that still fails at run time is recorded as an error row."""
    for task in config.tasks:
        for length in config.lengths_for(task):
            if not length:
                continue
            for cell in config.cells():
                if cell.ratio is None:
                    continue
                keep = math.ceil(length * (1.0 - cell.ratio) - 1e-9)
                protected = parse_method(cell.method).scorer.protected(length)
                if keep < protected:
                    raise KVSqueezeError(
                        f"{cell.method} always keeps {protected} tokens but ratio {cell.ratio:g} of a {length}-token "
                        f"context leaves {keep}; use a longer --context-length or a smaller ratio"
                    )


@dataclass
class Job:
    """One sample and its pending cells (the unit an executor runs: the cells share one prefill)."""

    sample: Sample
    cells: list[Cell]
    keys: list[str] = field(default_factory=list)


class ModelProvider:
    """Loads the tokenizer (cheap, needed to build samples) and, only when a cell runs, the model — once."""

    def __init__(self, name: str | None = None, dtype: str = "float32", device: str = "cpu"):
        self.name, self.dtype, self.device = name, dtype, device
        self.model_loads = 0

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        from kvsqueeze.models import resolve_model_dir

        ref, extra = resolve_model_dir(self.name)
        try:
            tok = AutoTokenizer.from_pretrained(ref, **extra)
        except OSError as exc:
            raise KVSqueezeError(f"cannot load the tokenizer of {self.name!r}: pass a local model directory") from exc
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    @cached_property
    def model(self):
        from kvsqueeze.models import load_model

        self.model_loads += 1
        model, _ = load_model(self.name, dtype=self.dtype, device=self.device)
        return model


# ---- rows ----------------------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    """Rows of a results file; a torn last line (interrupted write) is skipped."""
    rows = []
    if not path.is_file():
        return rows
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


class RowWriter:
    """Appends one JSON row per line: write, flush and fsync each, so finished rows survive any interruption."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_file() and path.stat().st_size:
            with path.open("rb") as fh:  # a torn last line must not glue onto the next row
                fh.seek(-1, os.SEEK_END)
                torn = fh.read(1) != b"\n"
            if torn:
                with path.open("a", encoding="utf-8") as fh:
                    fh.write("\n")
        self.fh = path.open("a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.fh.write(json.dumps(row, default=str) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


def environment() -> dict:
    """Package versions and the git commit of the checkout (None outside a git checkout)."""
    import torch
    import transformers

    import kvsqueeze

    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        got = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(kvsqueeze.__file__).parent, capture_output=True, text=True,
            timeout=10,
        )  # fmt: skip
        commit = got.stdout.strip() or None
    return {
        "versions": {
            "kvsqueeze": kvsqueeze.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "git_commit": commit,
    }


# ---- work ----------------------------------------------------------------------------------------------------
def run_job(job: Job, config: SweepConfig, model, tokenizer, env: dict) -> Iterator[dict]:
    """Rows of one job, one per cell (errors become rows); the cells of a sample are evaluated together."""
    sample = job.sample
    evaluator = SampleEvaluator(model, tokenizer, sample, config.query_aware)
    start = time.perf_counter()
    results = evaluator.run_all(job.cells)
    for cell, key, result in zip(job.cells, job.keys, results, strict=True):
        row = {
            "key": key,
            "task": sample.task,
            "sample_id": sample.id,
            "method": "full" if cell.method == "none" else cell.method,
            "spec": cell.method,
            "ratio": cell.ratio,
            "meta": sample.meta,
            "model": config.model or "embedded",
            "dtype": config.dtype,
            "seed": config.seed,
            "mode": config.mode,
            **env,
        }
        if isinstance(result, Exception):  # a failing method is recorded and the sweep goes on
            error = f"{type(result).__name__}: {result}".splitlines()[0][:500]
            row.update({"status": "error", "error": error, "cell_seconds": time.perf_counter() - start})
        else:
            row.update(result)
            row["status"] = "ok"
        row["finished_at"] = time.time()
        yield row


class LocalExecutor:
    """Runs jobs one after another in this process (one model, loaded once)."""

    name = "local"

    def run(self, jobs: list[Job], config: SweepConfig, provider: ModelProvider, on_row: Callable[[dict], None]):
        env = environment()
        for job in jobs:
            for row in run_job(job, config, provider.model, provider.tokenizer, env):
                on_row(row)


EXECUTORS: dict[str, Callable[[], object]] = {"local": LocalExecutor}


def get_executor(name: str):
    if name == "ray":
        from kvsqueeze.bench.ray_executor import RayExecutor

        return RayExecutor()
    if name not in EXECUTORS:
        raise KVSqueezeError(f"unknown executor {name!r}; valid: local, ray")
    return EXECUTORS[name]()


@dataclass
class SweepResult:
    rows_written: int
    cells_skipped: int
    errors: int
    seconds: float
    model_loads: int


def plan(config: SweepConfig, tokenizer, finished: set[str]) -> tuple[list[Job], int]:
    """Jobs with pending cells, and how many cells were already finished."""
    jobs, skipped = [], 0
    cells = config.cells()
    for task in config.tasks:
        for length in config.lengths_for(task):
            for sample in generate(task, tokenizer, samples=config.samples, length=length, seed=config.seed):
                job = Job(sample, [])
                for cell in cells:
                    key = config.key(sample, cell)
                    if key in finished:
                        skipped += 1
                    else:
                        job.cells.append(cell)
                        job.keys.append(key)
                if job.cells:
                    jobs.append(job)
    return jobs, skipped


def run_sweep(
    config: SweepConfig,
    provider: ModelProvider | None = None,
    executor=None,
    progress: bool = True,
    render: bool = True,
) -> SweepResult:
    """Run (or resume) a sweep into ``config.out`` and render the report."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    provider = provider or ModelProvider(config.model, config.dtype)
    executor = executor or LocalExecutor()
    config.out.mkdir(parents=True, exist_ok=True)
    path = config.out / RESULTS
    if not config.resume and path.is_file():
        path.rename(path.with_name(f"results.{int(time.time())}.jsonl.bak"))
    finished = {r["key"] for r in read_rows(path) if "key" in r}
    jobs, skipped = plan(config, provider.tokenizer, finished)
    total = sum(len(j.cells) for j in jobs)
    start = time.perf_counter()
    written = errors = 0
    if total:
        writer = RowWriter(path)
        columns = (
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("elapsed"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )  # fmt: skip
        with Progress(*columns, console=Console(stderr=True), disable=not progress, transient=False) as bar:
            handle = bar.add_task(f"{len(jobs)} samples", total=total)

            def on_row(row: dict) -> None:
                nonlocal written, errors
                writer.write(row)
                written += 1
                errors += row["status"] != "ok"
                ratio = "" if row["ratio"] is None else f"@{row['ratio']}"
                bar.update(handle, advance=1, description=f"{row['task']} {row['sample_id']} {row['method']}{ratio}")

            try:
                executor.run(jobs, config, provider, on_row)
            finally:
                writer.close()
    result = SweepResult(written, skipped, errors, time.perf_counter() - start, provider.model_loads)
    if render:
        from kvsqueeze.bench.report import render as render_report

        render_report(config.out)
    return result
