"""``kvsqueeze bench`` and ``kvsqueeze report``: added to the main Typer app by :func:`add_commands`.

Every input is validated (tasks, methods via ``parse_method``, ratios, lengths, jsonl datasets) before the model
loads; mistakes raise ``KVSqueezeError`` (one line, exit code 2).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from kvsqueeze.bench.tasks import task_help
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.models import DTYPE_HELP


def _user_errors(func):
    """Run ``func`` turning a ``KVSqueezeError`` into one line on stderr and exit code 2."""
    try:
        return func()
    except KVSqueezeError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def add_commands(app: typer.Typer) -> None:
    """Attach ``bench`` and ``report`` to ``app``."""

    @app.command()
    def bench(
        task: Annotated[str, typer.Option(help=task_help())] = "niah",
        methods: Annotated[str, typer.Option(help="comma-separated method specs (the full cache is always run)")] = (
            "snapkv,h2o,streaming_llm"
        ),
        ratios: Annotated[str, typer.Option(help="fractions of tokens removed, comma-separated")] = "0.25,0.5,0.75",
        samples: Annotated[int, typer.Option(min=1, help="samples per task and context length")] = 20,
        context_length: Annotated[
            str | None,
            typer.Option(help="context tokens, comma-separated (default 2048; speed: 1024,2048,4096; longgen: 512)"),
        ] = None,
        out: Annotated[str, typer.Option(help="run directory (results.jsonl, summary, plots)")] = "runs/bench",
        model: Annotated[str | None, typer.Option(help="Hub id, directory or .gguf (default: embedded)")] = None,
        dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "float32",
        device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N | mps | auto (local executor)")] = "cpu",
        seed: Annotated[int, typer.Option(help="seed of the task generators")] = 0,
        query_aware: Annotated[
            bool, typer.Option("--query-aware/--query-agnostic", help="compress with the question in the prompt")
        ] = False,
        resume: Annotated[bool, typer.Option("--resume/--no-resume", help="skip cells already in results")] = True,
        executor: Annotated[str, typer.Option(help="local | ray")] = "local",
        reuse: Annotated[
            str | None,
            typer.Option(
                help="rag: reuse strategies compared with the full recompute, comma-separated (prefix, kvlink"
                "[:recompute=N], ape[:temperature=T,scale=S], cachecraft[:fraction=F,max_deviation=D], "
                "kvshare[:fraction=F,decode_fraction=G,probe=L]; default: all of them, kvlink also with recompute=16)"
            ),
        ] = None,
        store: Annotated[
            str | None,
            typer.Option(
                help="rag: the chunk store shared by the sweep's samples and Ray workers (a directory, file:///path "
                "or redis://host:port; default: one in-process store)"
            ),
        ] = None,
        progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bar on stderr")] = True,
        threads: Annotated[
            int,
            typer.Option(
                help="torch intra-op threads of the local executor (0: torch's default). 1 is much faster on a busy "
                "or shared machine: decoding runs many small kernels per row and layer, and every multi-threaded "
                "kernel waits for all its threads"
            ),
        ] = 0,
    ) -> None:
        """Sweep methods × ratios over a task; write results.jsonl, summary.csv/.md and plots to --out."""
        err = Console(stderr=True)

        def work():
            from kvsqueeze.bench.runner import (
                SweepConfig,
                check_budgets,
                get_executor,
                parse_lengths,
                parse_methods,
                parse_ratios,
                parse_reuse_list,
                run_sweep,
            )
            from kvsqueeze.bench.tasks import parse_tasks
            from kvsqueeze.extras import require
            from kvsqueeze.models import parse_device, parse_dtype

            if not out.strip():  # typer would read an empty path as the current directory
                raise KVSqueezeError("--out is empty; give a run directory, e.g. --out runs/bench")
            parse_dtype(dtype)
            parse_device(device)
            require("kvsqueeze bench", "matplotlib")
            if threads < 0:
                raise KVSqueezeError(f"--threads must be >= 0 (0 = torch's default), got {threads}")
            tasks = parse_tasks(task)
            if (reuse is not None or store is not None) and not any(t.name == "rag" for t in tasks):
                raise KVSqueezeError("--reuse and --store are read by --task rag only; add rag to --task or drop them")
            if store is not None:
                from kvsqueeze.store import open as open_store

                open_store(store)  # an unreachable or unwritable store fails here, before any model work
            config = SweepConfig(
                tasks=tasks,
                methods=parse_methods(methods),
                ratios=parse_ratios(ratios),
                samples=samples,
                lengths=parse_lengths(context_length),
                model=model,
                dtype=dtype,
                device=device,
                seed=seed,
                query_aware=query_aware,
                out=Path(out),
                resume=resume,
                reuse=parse_reuse_list(reuse),
                store=store,
            )
            check_budgets(config)
            runner = get_executor(executor)
            _quiet()
            if threads:
                import torch

                torch.set_num_threads(threads)
            return run_sweep(config, executor=runner, progress=progress, warn=_warn)

        try:
            result = _user_errors(work)
        except KeyboardInterrupt:
            err.print(f"[yellow]interrupted[/yellow]: finished rows are kept in {out}/results.jsonl; rerun to resume")
            raise typer.Exit(130) from None
        err.print(
            f"{result.rows_written} cells run ({result.errors} failed), {result.cells_skipped} already done, "
            f"{result.seconds:.1f} s → {out}/summary.md"
        )

    @app.command()
    def report(run_dir: Annotated[Path, typer.Argument(help="a --out directory of `kvsqueeze bench`")]) -> None:
        """Re-render summary.csv, summary.md and the plots from RUN_DIR/results.jsonl."""
        from kvsqueeze.bench.report import render
        from kvsqueeze.extras import require

        _user_errors(lambda: require("kvsqueeze report", "matplotlib"))
        for path in _user_errors(lambda: render(run_dir, warn=_warn)):
            print(path)


def _warn(message: str) -> None:
    Console(stderr=True).print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def _quiet() -> None:
    """Silence transformers' and the Hub client's logging (an unreachable Hub id prints one error line, not every
    retry) and their progress bars."""
    import warnings

    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hub_logging.set_verbosity_error()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)


if __name__ == "__main__":  # pragma: no cover
    _app = typer.Typer()
    add_commands(_app)
    sys.exit(_app())
