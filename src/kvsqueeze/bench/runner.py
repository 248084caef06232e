"""The sweep: every sample × (full cache + method × ratio), one captured prefill per sample, rows on disk.

- A *cell* is (task, sample, method, ratio) under one run configuration (model, dtype, seed, query mode); its key
  identifies the row in ``results.jsonl``. The key holds a hash of the sample's content (context, questions,
  continuation) and the task's generator version, never a path as typed: editing a ``file:`` dataset reruns the
  edited lines, and the same file by another path reruns nothing. With ``resume`` (default) finished cells (ok or
  failed) are skipped; a sample whose cells are all finished does no model work, and the model is loaded only if
  some cell is pending.
- One sweep at a time per run directory: a lock (``.kvsqueeze.lock``, released by the OS even on ``kill -9``)
  makes a second sweep on the same ``--out`` fail at once, naming the holder. A run directory holds one
  configuration (model, dtype, query mode): mixing them is refused.
- Rows are appended one line at a time (write, flush, fsync), so Ctrl-C or a crash keeps every finished row; a torn
  last line (a crash mid-write) is cut off when the next sweep starts, so the file is always valid JSONL.
- Before any model work the requested context lengths (and every ``file:`` sample) are checked against the
  model's maximum positions and the available memory.
- A cell that raises is recorded with ``status: "error"`` and its message; the sweep goes on.
- Methods that do not evict (a codec alone, e.g. ``kivi``) and methods whose decoding schedule fixes its own
  budget (``h2o+interval:every=16,budget=256``) run once per sample with ``ratio: null``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from kvsqueeze.bench.evaluators import Cell, evaluator_for
from kvsqueeze.bench.tasks import TaskSpec, default_lengths, generate, generated_tokens, task_version
from kvsqueeze.bench.tasks.base import Sample
from kvsqueeze.errors import KVSqueezeError, os_reason
from kvsqueeze.prompts import encode
from kvsqueeze.spec import parse_method

RESULTS = "results.jsonl"
LOCK = ".kvsqueeze.lock"
# Part of every cell key: bump it when a change to evaluation or scoring makes old rows wrong (2: gold
# log-likelihood tokenized as it follows the answer prefix), so that resume reruns them.
KEY_VERSION = 2
REQUIRED = {"task": str, "sample_id": (str, int), "method": str, "status": str}


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
    if not pieces:
        raise KVSqueezeError("no method given; e.g. --methods snapkv,h2o (the full cache is always run)")
    specs: list[str] = []
    for piece in pieces:
        if piece.lower() in ("full", "none"):
            continue
        spec = parse_method(piece).spec()
        if spec not in specs:
            specs.append(spec)
    return specs


DEFAULT_REUSE = ("prefix", "kvlink", "kvlink:recompute=16", "ape", "cachecraft", "kvshare")
MEMORY_STORE_BYTES = 2 << 30  # the in-process chunk store's bound (least recently used out): a sweep stays bounded


def parse_reuse_list(text: str | None) -> list[str]:
    """Comma-separated reuse strategies of the ``rag`` task (``kvlink:recompute=16``), validated and normalized;
    None: :data:`DEFAULT_REUSE` (a text naming no strategy, such as ``","``, is refused)."""
    from kvsqueeze.reuse.rag import parse_reuse, spec_of

    pieces: list[str] = []
    for piece in (text or "").split(","):
        piece = piece.strip()
        if not piece:
            continue
        if "=" in piece and ":" not in piece and pieces and ":" in pieces[-1]:
            pieces[-1] += "," + piece  # a strategy's second parameter
        else:
            pieces.append(piece)
    if text is not None and not pieces:
        raise KVSqueezeError("no reuse strategy given; e.g. --reuse kvshare,cachecraft (omit --reuse for the defaults)")
    specs: list[str] = []
    for piece in pieces or DEFAULT_REUSE:
        if piece.lower() in ("full", "none"):
            continue
        spec = spec_of(parse_reuse(piece))
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
    device: str = "cpu"  # where the local executor runs the model (not part of a cell's key)
    seed: int = 0
    query_aware: bool = False
    out: Path = Path("runs/bench")
    resume: bool = True
    reuse: list[str] = field(default_factory=lambda: list(DEFAULT_REUSE))  # rag: reuse strategies (normalized)
    store: str | None = None  # rag: the chunk store's URL shared by the sweep (None: one in-process store)

    def cells_for(self, task: TaskSpec) -> list[Cell]:
        """The cells of every sample of ``task``: rag compares reuse strategies with the full recompute, every other
        task methods × ratios with the full cache."""
        if task.name == "rag":
            return [Cell("none", None), *(Cell(f"reuse:{spec}", None) for spec in self.reuse)]
        return self.cells()

    def cells(self) -> list[Cell]:
        cells = [Cell("none", None)]
        for spec in self.methods:
            method = parse_method(spec)
            # a retrieval codec's ratio sets what stays hot (kvsqueeze.retrieval.base): it sweeps ratios too
            swept = method.evicts or method.codec.retrieves
            if swept and getattr(method.schedule, "budget", None) is None:
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
        task = "file" if sample.task.startswith("file:") else sample.task  # a dataset is known by its content
        return json.dumps(
            [
                KEY_VERSION,
                task,
                task_version(task),
                sample.id,
                sample_digest(sample),
                cell.method,
                cell.ratio,
                self.model or "embedded",
                self.dtype,
                self.seed,
                self.mode,
            ]
        )


def sample_digest(sample: Sample) -> str:
    """A hash of everything a sample's evaluation reads (context, questions, continuation, kind, history)."""
    parts = [sample.kind, sample.context, [asdict(q) for q in sample.questions], sample.continuation]
    if sample.documents:  # (only then: the digests of other tasks stay what they were)
        parts.append(list(sample.documents))
    if sample.history != "model":
        parts.append(sample.history)
    payload = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def check_budgets(config: SweepConfig) -> None:
    """Reject (before any model work) a method × ratio whose budget at a requested context length is smaller than
    the tokens the method always keeps (SnapKV's window, StreamingLLM's sinks …). File datasets are not checked
    (their lengths are per sample); a cell that still fails at run time is recorded as an error row."""
    for task in config.tasks:
        for length in config.lengths_for(task):
            if not length or task.name == "rag":
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
    def config(self):
        """The model's config (read and checked to be a causal LM before anything else loads)."""
        from kvsqueeze.models import load_config

        return load_config(self.name)

    @cached_property
    def tokenizer(self):
        from kvsqueeze.models import load_tokenizer

        self.config  # noqa: B018 - a wrong model fails here, in one line, before the tokenizer loads
        return load_tokenizer(self.name)

    @cached_property
    def model(self):
        from kvsqueeze.models import load_model

        self.model_loads += 1
        model, _ = load_model(self.name, dtype=self.dtype, device=self.device, tokenizer=self.tokenizer)
        return model

    def check_fits(self, tokens: int, what: str, fix: str) -> None:
        """Refuse a sequence the model cannot hold (positions, memory) before any model work."""
        from kvsqueeze.models import check_context_fits

        check_context_fits(self.config, tokens, self.dtype, what=what, fix=fix)


# ---- rows ----------------------------------------------------------------------------------------------------
@dataclass
class Scan:
    """The valid rows of a results file and what was skipped (line number and reason of each bad line)."""

    rows: list[dict]
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        if not self.skipped:
            return ""
        line, why = self.skipped[0]
        return f"{len(self.skipped)} malformed line(s) skipped (line {line}: {why})"


def row_problem(row) -> str | None:
    """Why ``row`` is not a usable result row (None when it is)."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    for name, kind in REQUIRED.items():
        if not isinstance(row.get(name), kind) or isinstance(row.get(name), bool):
            return f"field {name!r} missing or not a {getattr(kind, '__name__', 'string')}"
    ratio = row.get("ratio")
    if ratio is not None and (not isinstance(ratio, (int, float)) or isinstance(ratio, bool)):
        return "field 'ratio' is not a number"
    if not isinstance(row.get("scores", {}), dict) or not isinstance(row.get("meta", {}), dict):
        return "field 'scores' or 'meta' is not an object"
    return None


def scan_rows(path: Path) -> Scan:
    """Every valid row of a results file, skipping (and listing) lines that are not UTF-8, not JSON, not an object
    or lack a result's fields — a torn last line included."""
    scan = Scan([])
    if not path.is_file():
        return scan
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                scan.skipped.append((n, "not UTF-8 text"))
                continue
            except json.JSONDecodeError:
                scan.skipped.append((n, "not valid JSON"))
                continue
            problem = row_problem(row)
            if problem:
                scan.skipped.append((n, problem))
            else:
                scan.rows.append(row)
    return scan


def read_rows(path: Path) -> list[dict]:
    """The valid rows of a results file (see :func:`scan_rows`)."""
    return scan_rows(path).rows


def cell_slot(row: dict) -> tuple:
    """What a row measures, independent of when it ran and of the sample's content: two rows with the same slot
    are the same cell (a second sweep on the same directory, or a sample rerun after its content changed)."""
    return (row["task"], str(row["sample_id"]), row["method"], row.get("ratio"), row.get("model"), row.get("dtype"),
            row.get("seed"), row.get("mode"))  # fmt: skip


def latest_rows(rows: list[dict]) -> tuple[list[dict], int]:
    """One row per cell slot — the last written (rows are appended in time order) — and how many were dropped."""
    last: dict[tuple, dict] = {}
    for row in rows:
        last[cell_slot(row)] = row
    kept = list(last.values())
    return kept, len(rows) - len(kept)


def repair_tail(path: Path) -> bool:
    """Make ``path`` valid JSONL again after a crash mid-write: a torn last line (no newline) is cut off, or, if it
    happens to be a whole row, terminated. Returns whether the file was changed."""
    if not path.is_file():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    begin = data.rfind(b"\n") + 1
    try:
        whole = row_problem(json.loads(data[begin:].decode("utf-8"))) is None
    except (UnicodeDecodeError, json.JSONDecodeError):
        whole = False
    with path.open("rb+") as fh:
        if whole:
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")
        else:
            fh.truncate(begin)
    return True


class RowWriter:
    """Appends one JSON row per line: write, flush and fsync each, so finished rows survive any interruption."""

    def __init__(self, path: Path):
        self.path = path
        repair_tail(path)  # a torn last line must not glue onto the next row
        self.fh = path.open("a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.fh.write(json.dumps(row, default=str) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


# ---- the run directory -----------------------------------------------------------------------------------------
def prepare_out(out: Path) -> None:
    """Create the run directory and prove it writable (one line naming the fix otherwise)."""
    if out.exists() and not out.is_dir():
        raise KVSqueezeError(f"--out {out} is an existing file; give a directory for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise KVSqueezeError(
            f"cannot write to --out {out}: {os_reason(exc, out)}; choose a writable directory"
        ) from None


@contextlib.contextmanager
def run_lock(out: Path):
    """Hold the run directory for one sweep; a second sweep on it fails at once, naming the holder."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(out / LOCK), timeout=0)
    holder = out / (LOCK + ".json")
    try:
        lock.acquire()
    except Timeout:
        who = "another process"
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            info = json.loads(holder.read_text(encoding="utf-8"))
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
            who = f"pid {info['pid']} on {info['host']} (started {started})"
        raise KVSqueezeError(
            f"{out} is in use by another sweep: {who}; wait for it to finish or give another --out"
        ) from None
    try:
        with contextlib.suppress(OSError):
            holder.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        yield
    finally:
        with contextlib.suppress(OSError):
            holder.unlink()
        lock.release()


def check_same_configuration(config: SweepConfig, rows: list[dict]) -> None:
    """A run directory holds one configuration: refuse to add rows of another model, dtype or query mode."""
    want = {"model": config.model or "embedded", "dtype": config.dtype, "mode": config.mode}
    for row in rows:
        for name, value in want.items():
            if name in row and row[name] != value:
                raise KVSqueezeError(
                    f"{config.out} holds results with {name} {row[name]!r}, this sweep uses {value!r}; give another "
                    "--out (one run directory per model, dtype and query mode)"
                )


def check_lengths(config: SweepConfig, provider) -> None:
    """Every requested context length plus the tokens the task generates must fit the model (before any sample is
    generated: a 100k-token request fails in one line, not after minutes)."""
    if not hasattr(provider, "check_fits"):
        return
    for task in config.tasks:
        for length in config.lengths_for(task):
            if length:
                need = length + generated_tokens(task)
                provider.check_fits(need, what=f"--context-length {length} for task {task.label}",
                                    fix="give a smaller --context-length")  # fmt: skip


def check_method_setup(config: SweepConfig, provider) -> None:
    """Every method's codec can encode the model's head dimension (read from its config) and finds what it needs on
    this machine (a cold directory), before any sample is generated: a bad ``kivi:group=`` or ``dir=`` fails in one
    line, not as a failed row of every cell."""
    if not hasattr(provider, "config"):
        return
    from kvsqueeze.models import head_dim_of

    head_dim = head_dim_of(provider.config)
    for spec in config.methods:
        parse_method(spec).codec.check_setup(head_dim)


def check_sample_fits(sample: Sample, tokenizer, provider) -> None:
    """A ``file:`` sample's prompt plus its answer must fit the model (its length is known only here)."""
    if not hasattr(provider, "check_fits") or not sample.task.startswith("file:"):
        return
    q = sample.questions[0]
    tokens = len(encode(tokenizer, sample.context)) + len(encode(tokenizer, q.text + q.answer_prefix)) + 64
    provider.check_fits(tokens + q.max_new_tokens, what=f"{sample.task} {sample.id} (context, question and answer)",
                        fix="shorten that sample's context")  # fmt: skip


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
def run_job(job: Job, config: SweepConfig, model, tokenizer, env: dict, store=None) -> Iterator[dict]:
    """Rows of one job, one per cell (errors become rows); the cells of a sample are evaluated together. ``store``:
    the chunk store that ``rag`` samples share (see :func:`open_store`)."""
    sample = job.sample
    evaluator = evaluator_for(model, tokenizer, sample, config.query_aware, store=store)
    start = time.perf_counter()
    memo = None
    if sample.kind in (
        "qa",
        "continuation",
        "multiturn",
        "multirequest",
        "convqa",
    ):  # cells built from one captured prefill share scoring work
        memo = TimedMemo()
        evaluator.prefill.memo = memo
    results = evaluator.run_all(job.cells)
    one_off = memo.payers(job.cells) if memo is not None else {}
    for i, (cell, key, result) in enumerate(zip(job.cells, job.keys, results, strict=True)):
        row = {
            "key": key,
            "task": sample.task,
            "sample_id": sample.id,
            "method": "full" if cell.method == "none" else cell.method,
            "spec": cell.method,
            "ratio": cell.ratio,
            "meta": sample.meta,
            "sample_digest": sample_digest(sample),
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
            if i in one_off:  # this cell computed work every later cell of the sample reused
                row["one_off_seconds"] = one_off[i]
        row["finished_at"] = time.time()
        yield row


class TimedMemo(dict):
    """The prefill memo (``policies.base.prefill_memo``: work shared by every cache built from one prefill, such as
    H2O's accumulated attention) that also times each computation, by memo name.

    ``prefill_memo`` asks ``key in memo`` and, on a miss, stores ``fn()``: the time between the two is the
    computation. Memo names start with the scorer's name (``"h2o.accumulated"``), and caches are built in cell
    order, so the first cell whose scorer has that name paid for it: its ``compression_seconds`` include this
    one-off cost, which the report shows as its own bar."""

    def __init__(self):
        super().__init__()
        self.seconds: dict[str, float] = defaultdict(float)
        self._missed: tuple[object, float] | None = None

    def __contains__(self, key) -> bool:
        found = super().__contains__(key)
        if not found:
            self._missed = (key, time.perf_counter())
        return found

    def __setitem__(self, key, value) -> None:
        if self._missed is not None and self._missed[0] == key and isinstance(key, tuple) and key:
            self.seconds[str(key[0])] += time.perf_counter() - self._missed[1]
        self._missed = None
        super().__setitem__(key, value)

    def payers(self, cells: list[Cell]) -> dict[int, float]:
        """Seconds of one-off work per index of the cell that paid for it."""
        paid: dict[int, float] = defaultdict(float)
        for name, seconds in self.seconds.items():
            scorer = name.split(".")[0]
            for i, cell in enumerate(cells):
                if cell.method != "none" and parse_method(cell.method).scorer.name == scorer:
                    paid[i] += seconds
                    break
        return dict(paid)


def open_store(config: SweepConfig):
    """The chunk store of a sweep's ``rag`` samples: ``config.store`` (shared by processes and Ray workers when it is
    a directory or Redis), else an in-process one (at most ``MEMORY_STORE_BYTES``) that lives as long as the
    executor's run."""
    from kvsqueeze.store import open as open_url

    if config.store:
        return open_url(config.store)
    return open_url("memory://", max_bytes=MEMORY_STORE_BYTES)


class LocalExecutor:
    """Runs jobs one after another in this process (one model, loaded once)."""

    name = "local"

    def run(self, jobs: list[Job], config: SweepConfig, provider: ModelProvider, on_row: Callable[[dict], None]):
        env = environment()
        store = open_store(config) if any(job.sample.kind == "rag" for job in jobs) else None
        for job in jobs:
            for row in run_job(job, config, provider.model, provider.tokenizer, env, store):
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


def plan(config: SweepConfig, tokenizer, finished: set[str], provider=None) -> tuple[list[Job], int]:
    """Jobs with pending cells, and how many cells were already finished."""
    jobs, skipped = [], 0
    for task in config.tasks:
        cells = config.cells_for(task)
        for length in config.lengths_for(task):
            for sample in generate(task, tokenizer, samples=config.samples, length=length, seed=config.seed):
                check_sample_fits(sample, tokenizer, provider)
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
    warn: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run (or resume) a sweep into ``config.out`` (held by a lock meanwhile) and render the report; ``warn``
    receives one-line notes (a repaired torn line, skipped malformed rows)."""
    provider = provider or ModelProvider(config.model, config.dtype, config.device)
    executor = executor or LocalExecutor()
    check_lengths(config, provider)  # a wrong model or an impossible length: refused before --out is touched
    check_method_setup(config, provider)
    prepare_out(config.out)
    with run_lock(config.out):
        return _locked_sweep(config, provider, executor, progress, render, warn)


def _locked_sweep(config: SweepConfig, provider, executor, progress: bool, render: bool, warn) -> SweepResult:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    path = config.out / RESULTS
    if not config.resume and path.is_file():
        path.rename(path.with_name(f"results.{int(time.time())}.jsonl.bak"))
    if repair_tail(path) and warn is not None:
        warn(f"{path}: the torn last line of an interrupted sweep was repaired")
    existing = read_rows(path)
    check_same_configuration(config, existing)
    finished = {r["key"] for r in existing if isinstance(r.get("key"), str)}
    jobs, skipped = plan(config, provider.tokenizer, finished, provider)
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

        render_report(config.out, warn=warn)
    return result
