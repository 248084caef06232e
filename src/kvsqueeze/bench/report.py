"""Tables and plots from ``results.jsonl`` (``kvsqueeze report DIR`` re-renders them without any model work).

Outputs in the run directory:

- ``summary.csv`` — long format: task, method, ratio, metric, n, mean and the 95 % interval ``ci_low``–``ci_high``
  with its kind (``interval``): Wilson's score interval for 0/1 scores (found / not found), Student's t for
  continuous numbers, none for a single sample;
- ``summary.md`` — per task: method × ratio tables of the primary score (mean and interval) and of bytes, the
  speed and long-generation tables, and the failed cells;
- ``score_vs_ratio_<task>.png``, ``pareto_<task>.png`` (score vs cache bytes per token: quantized and evicting
  methods compared at equal bytes; hot bytes per token — at rest plus one step's fetch — when a row keeps a cold
  tier (retrieval methods), whose hot bytes and bytes fetched per step also get their own tables; each method its
  own marker and line style, so overlapping lines stay visible),
  ``niah_heatmap.png`` (score by depth × length), ``speed.png`` (work shared by every ratio of a sample, such as
  H2O's accumulated attention, is its own "one-off scoring" bar instead of being charged to the first ratio).

Rows are read defensively: lines that are not UTF-8, not JSON or not a result row are skipped and reported; when a
cell appears more than once (two sweeps on one directory, a sample rerun after its content changed) only its last
row counts. Speed rows are also divided by the full cache's row of the same sample (``*_vs_full``).
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from collections.abc import Callable
from itertools import count
from pathlib import Path

from kvsqueeze.bench.runner import RESULTS, latest_rows, scan_rows
from kvsqueeze.bench.scoring import interval, is_binary
from kvsqueeze.errors import KVSqueezeError, os_reason

LOWER_IS_BETTER = {"ppl": "perplexity", "fidelity": "KL(full ‖ compressed), nats"}
SCORE_LABELS = {"longgen": "top-1 agreement with the full cache's generation (higher is better)"}
_EXTRA = ("bytes_per_token", "cache_fraction", "compression_seconds", "decode_tokens_per_second", "prefill_seconds",
          "tokens_kept_mean", "decode_vs_full", "ttft_seconds", "recomputed_fraction",
          "fetched_bytes_per_token", "fetched_bytes_per_step")  # fmt: skip
_RAG = ("score", "kl_gold", "ttft_seconds", "ttft_vs_full", "recomputed_fraction")
_SPEED = ("prefill_vs_full", "decode_vs_full", "bytes_vs_full", "hot_vs_full", "peak_vs_full", "gpu_peak_vs_full")
_SPEED_LABELS = ("prefill time", "decode tok/s", "bytes held", "hot bytes", "peak cache bytes", "GPU peak memory")
FIELDS = ["task", "method", "ratio", "metric", "n", "mean", "ci_low", "ci_high", "interval"]
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*")
LINESTYLES = ("-", "--", "-.", ":")


def _label(method: str, ratio) -> str:
    return method if ratio is None else f"{method}@{ratio:g}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _metrics(rows: list[dict]) -> list[dict]:
    """Flatten each ok row into numbers (scores + bytes + timings + speed ratios vs. the full cache)."""
    full = {(r["task"], r["sample_id"]): r for r in rows if r["method"] == "full"}
    out = []
    for r in rows:
        m = {k: v for k, v in r.get("scores", {}).items() if isinstance(v, (int, float))}
        for k in _EXTRA:
            if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool):
                m[k] = r[k]
        one_off = r.get("one_off_seconds")
        if isinstance(one_off, (int, float)) and "compression_seconds" in m:  # per-ratio work only; see speed.png
            m["compression_seconds"] = max(m["compression_seconds"] - one_off, 0.0)
        if _number(r.get("full_bytes")) and _number(r.get("cache_bytes")) and r["full_bytes"]:
            m["cache_fraction"] = r["cache_bytes"] / r["full_bytes"]
        tokens = r.get("tokens_compressed") or r.get("context_tokens")
        if _number(r.get("hot_bytes")) and _number(tokens) and tokens:  # retrieval: what stays in fast memory
            step = r.get("fetched_bytes_per_step") if _number(r.get("fetched_bytes_per_step")) else 0.0
            m["hot_bytes_per_token"] = (r["hot_bytes"] + step) / tokens  # at rest plus one step's working set
            if _number(r.get("full_bytes")) and r["full_bytes"]:
                m["hot_fraction"] = r["hot_bytes"] / r["full_bytes"]
        ref = full.get((r["task"], r["sample_id"]))
        rag = r["task"] == "rag" and ref is not None and _number(r.get("ttft_seconds"))
        if rag and _number(ref.get("ttft_seconds")) and ref["ttft_seconds"]:
            m["ttft_vs_full"] = r["ttft_seconds"] / ref["ttft_seconds"]
        if r["task"] == "speed" and ref is not None:
            for name, key in (("prefill_vs_full", "prefill_seconds"), ("decode_vs_full", "decode_tokens_per_second"),
                              ("bytes_vs_full", "cache_bytes"), ("hot_vs_full", "hot_bytes"),
                              ("peak_vs_full", "peak_cache_bytes"),
                              ("gpu_peak_vs_full", "gpu_peak_bytes")):  # fmt: skip
                if _number(ref.get(key)) and ref[key] and _number(r.get(key)):
                    m[name] = r[key] / ref[key]
            for key in ("peak_cache_bytes", "gpu_peak_bytes"):
                if _number(r.get(key)):
                    m[key] = r[key]
        out.append({"task": r["task"], "method": r["method"], "ratio": r["ratio"], "meta": r.get("meta", {}), **m})
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and 95 % interval (:func:`kvsqueeze.bench.scoring.interval`) per task × method × ratio × metric."""
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for m in _metrics(rows):
        key = (m["task"], m["method"], m["ratio"])
        for name, value in m.items():
            if name not in ("task", "method", "ratio", "meta") and isinstance(value, (int, float)):
                groups[key][name].append(float(value))
    out = []
    for (task, method, ratio), metrics in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        for name, values in sorted(metrics.items()):
            iv = interval(values, binary=is_proportion(task, name) and is_binary(values))
            out.append({"task": task, "method": method, "ratio": ratio, "metric": name, "n": iv.n, "mean": iv.mean,
                        "ci_low": iv.low, "ci_high": iv.high, "interval": iv.kind})  # fmt: skip
    return out


def is_proportion(task: str, metric: str) -> bool:
    """Whether ``metric`` of ``task`` is a success/failure outcome per sample (an answer found or not), so that a
    binomial (Wilson) interval applies when every value is 0 or 1. Perplexity, KL, agreement fractions, bytes and
    timings are continuous, even when they happen to be 0 or 1 (the full cache's KL, a ratio to itself)."""
    continuous_task = task in LOWER_IS_BETTER or task in SCORE_LABELS
    return not continuous_task and re.fullmatch(r"score|turn\d+", metric) is not None


def has_cold(rows: list[dict]) -> bool:
    """Whether any row keeps bytes in a cold tier (a retrieval method): its plots and tables then show hot bytes."""
    return any(_number(r.get("cold_bytes")) and r["cold_bytes"] > 0 for r in rows)


def _order(key: tuple) -> tuple:
    task, method, ratio = key
    return (task, method != "full", method, -1.0 if ratio is None else ratio)


def _fmt(s: dict | None) -> str:
    """``mean [low, high]`` (``mean (n=1)`` without an interval); empty for a missing cell."""
    if not s:
        return ""
    mean = s["mean"]
    if mean is None or math.isnan(mean):
        return "–"
    digits = 3 if abs(mean) < 10 else 1
    if s["interval"] == "none":
        return f"{mean:.{digits}f} (n={s['n']})"
    return f"{mean:.{digits}f} [{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; every row padded or cut to the header's width (never a malformed table)."""
    width = len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * width]
    for row in rows:
        cells = [str(c).replace("|", "\\|").replace("\n", " ") for c in row][:width]
        cells += [""] * (width - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _lookup(summary: list[dict]) -> dict:
    return {(s["task"], s["method"], s["ratio"], s["metric"]): s for s in summary}


def _header(all_rows: list[dict]) -> list[str]:
    configs = []
    for r in all_rows:
        c = (r.get("model"), r.get("dtype"), r.get("mode"), r.get("seed"))
        if c not in configs:
            configs.append(c)
    first = all_rows[0]
    lines = []
    for model, dtype, mode, seed in configs:
        lines.append(f"model `{model}` · dtype `{dtype}` · {mode} · seed {seed}")
    versions = first.get("versions") if isinstance(first.get("versions"), dict) else {}
    commit = first.get("git_commit") if isinstance(first.get("git_commit"), str) else "unknown"
    lines[-1] += f" · commit `{commit[:10]}` · " + ", ".join(f"{k} {v}" for k, v in versions.items())
    if len(configs) > 1:
        lines.append("")
        lines.append(f"**{len(configs)} configurations are pooled in this directory**; compare them in separate runs.")
    return lines


def _markdown(rows: list[dict], all_rows: list[dict], summary: list[dict]) -> str:
    look = _lookup(summary)
    lines = ["# kvsqueeze benchmark results", "", *_header(all_rows), ""]
    lines.append(
        "Scores are means over samples with a 95 % confidence interval `[low, high]`: Wilson's score interval for "
        "0/1 scores (an answer found or not), Student's t for continuous scores; `(n=1)` marks a single sample "
        "(no interval). `ratio` is the fraction of context tokens removed; `full` is the uncompressed cache."
    )
    lines.append("")
    errors = [r for r in all_rows if r.get("status") != "ok"]
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        methods = sorted({r["method"] for r in task_rows}, key=lambda m: (m != "full", m))
        ratios = sorted({r["ratio"] for r in task_rows if r["ratio"] is not None})
        columns = [*ratios, None] if any(r["ratio"] is None for r in task_rows) else ratios
        names = [f"ratio {r:g}" if r is not None else "no ratio" for r in columns]
        n = len({r["sample_id"] for r in task_rows})
        what = LOWER_IS_BETTER.get(task) or SCORE_LABELS.get(
            task, "score (fraction of expected answers found; higher is better)"
        )
        lines += [f"## {task} ({n} samples) — {what}", ""]
        if task in LOWER_IS_BETTER:
            lines += ["lower is better", ""]
        lines += _table(["method", *names],
                        [[m, *(_fmt(look.get((task, m, r, "score"))) for r in columns)] for m in methods])  # fmt: skip
        lines += ["Cache bytes per context token (mean):", ""]
        bytes_rows = []
        for m in methods:
            cells = [look.get((task, m, r, "bytes_per_token")) for r in columns]
            bytes_rows.append([m, *(f"{c['mean']:.0f}" if c else "" for c in cells)])
        lines += _table(["method", *names], bytes_rows)
        if has_cold(task_rows):
            for title, key in (("Hot bytes per context token (mean; at rest plus one step's fetch, the cold tier "
                                "apart):", "hot_bytes_per_token"),
                               ("Bytes fetched from the cold tier per step (forward pass; mean):",
                                "fetched_bytes_per_step")):  # fmt: skip
                lines += [title, ""]
                body = []
                for m in methods:
                    cells = [look.get((task, m, r, key)) for r in columns]
                    body.append([m, *(f"{c['mean']:.0f}" if c else "" for c in cells)])
                lines += _table(["method", *names], body)
        if task == "longgen":
            lines += _longgen_table(task_rows, look)
        lines += _turns_table(task, task_rows, look)
        if task == "rag":
            lines += ["Reuse vs. the full recompute (`full`): KL over the gold answer, time to first token (seconds "
                      "and ratio), fraction of context tokens computed for the request:", ""]  # fmt: skip
            body = [[m, *(_fmt(look.get((task, m, None, k))) for k in _RAG)] for m in methods]
            lines += _table(["method", "score", "KL", "TTFT s", "TTFT / full", "recomputed"], body)
    speed = [s for s in summary if s["task"] == "speed" and s["metric"] in _SPEED]
    if speed:
        lines += ["## speed vs. the full cache (ratios; < 1 = less time / fewer bytes)", ""]
        shown = [k for k in _SPEED if any(s["metric"] == k for s in speed)]  # GPU peak: CUDA runs only
        body = []
        for method, ratio in sorted({(s["method"], s["ratio"]) for s in speed}, key=lambda x: _order(("", *x))):
            cells = [look.get(("speed", method, ratio, k)) for k in shown]
            body.append([method, "" if ratio is None else f"{ratio:g}", *(_fmt(c) for c in cells)])
        labels = [_SPEED_LABELS[_SPEED.index(k)] for k in shown]
        lines += _table(["method", "ratio", *labels], body)
    if errors:
        lines += [f"## failed cells ({len(errors)})", ""]
        grouped: dict[tuple, int] = defaultdict(int)
        for r in errors:
            grouped[(r["task"], r["method"], r.get("ratio"), str(r.get("error")))] += 1
        body = [[task, method, "" if ratio is None else f"{ratio:g}", str(count), error]
                for (task, method, ratio, error), count in grouped.items()]  # fmt: skip
        lines += _table(["task", "method", "ratio", "cells", "error"], body)
    return "\n".join(lines)


def _longgen_table(task_rows: list[dict], look: dict) -> list[str]:
    """Per method × ratio: KL, tokens held per KV head at the end, decode tok/s ÷ the full cache's."""
    lines = ["Long generation: mean KL(full ‖ compressed) in nats, tokens held per KV head at the end, decode "
             "tokens/s ÷ the full cache's (same samples):", ""]  # fmt: skip
    body = []
    for method, ratio in sorted({(r["method"], r["ratio"]) for r in task_rows}, key=lambda x: _order(("", *x))):
        cells = [look.get(("longgen", method, ratio, k)) for k in ("kl", "tokens_kept_mean", "decode_vs_full")]
        body.append([method, "" if ratio is None else f"{ratio:g}", *(_fmt(c) for c in cells)])
    return lines + _table(["method", "ratio", "KL", "tokens held", "decode vs full"], body)


def family(method: str) -> str:
    """The family a result row's method belongs to (the registry's, of its scorer, else of its codec): what the
    per-turn plot groups by. ``full`` is the full cache, ``reuse:…`` the reuse strategies."""
    if method == "full":
        return "full"
    if method.startswith("reuse:"):
        return "reuse"
    from kvsqueeze.spec import parse_method, registry

    try:
        parsed = parse_method(method)
    except KVSqueezeError:
        return "other"
    part = parsed.scorer if parsed.scorer.name != "none" else parsed.codec
    return registry()[part.name].family or "other"


def turn_metrics(task_rows: list[dict]) -> list[str]:
    """``turn1 … turnN`` scored by the rows of a task (multi-turn and multi-request sessions), in turn order."""
    names = {k for r in task_rows for k in r.get("scores", {}) if re.fullmatch(r"turn\d+", k)}
    return sorted(names, key=lambda k: int(k[4:]))


def _turns_table(task: str, task_rows: list[dict], look: dict) -> list[str]:
    turns = turn_metrics(task_rows)
    if not turns:
        return []
    cells = sorted({(r["method"], r["ratio"]) for r in task_rows}, key=lambda x: _order(("", *x)))
    body = [[_label(m, r), family(m), *(_fmt(look.get((task, m, r, t))) for t in turns)] for m, r in cells]
    return ["Score per turn (decay over a session shows here):", "",
            *_table(["method", "family", *(f"turn {t[4:]}" for t in turns)], body)]  # fmt: skip


def _turns_plot(plt, task: str, task_rows: list[dict], look: dict, path: Path) -> Path | None:
    """Score vs. turn index, one line per method × ratio, coloured by family."""
    turns = turn_metrics(task_rows)
    if len(turns) < 2:
        return None
    cells = sorted({(r["method"], r["ratio"]) for r in task_rows}, key=lambda x: _order(("", *x)))
    families = sorted({family(m) for m, _ in cells})
    colours = dict(zip(families, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, strict=False))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (method, ratio) in enumerate(cells):
        ys = [look.get((task, method, ratio, t), {}).get("mean", float("nan")) for t in turns]
        fam = family(method)
        style = {"color": "black", "ls": "--"} if fam == "full" else {"color": colours[fam]}
        ax.plot(range(1, len(turns) + 1), ys, marker=MARKERS[i % len(MARKERS)], label=f"{_label(method, ratio)} "
                f"({fam})", alpha=0.85, **style)  # fmt: skip
    ax.set_xlabel("turn")
    ax.set_ylabel("score")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(range(1, len(turns) + 1))
    ax.set_title(f"{task}: score per turn")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _errorbar(s: dict) -> tuple[float, float]:
    """Distances from the mean to the interval's ends (0 without an interval)."""
    if s["interval"] == "none" or math.isnan(s["ci_low"]):
        return 0.0, 0.0
    return max(s["mean"] - s["ci_low"], 0.0), max(s["ci_high"] - s["mean"], 0.0)


def _plots(rows: list[dict], summary: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    look = _lookup(summary)
    made: list[Path] = []
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        methods = sorted({r["method"] for r in task_rows} - {"full"})
        ylabel = LOWER_IS_BETTER.get(task) or ("top-1 agreement" if task in SCORE_LABELS else "score")
        # score vs ratio
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        full = look.get((task, "full", None, "score"))
        if full:
            ax.axhline(full["mean"], color="black", ls="--", lw=1, label="full cache")
        styles = dict(zip(methods, _styles(), strict=False))
        for i, method in enumerate(methods):
            pts = sorted(
                (s["ratio"], s["mean"], *_errorbar(s)) for (t, m, r, k), s in look.items()
                if t == task and m == method and k == "score" and r is not None
            )  # fmt: skip
            if pts:
                xs, ys, lo, hi = zip(*pts, strict=True)
                dodge = (i - (len(methods) - 1) / 2) * 0.006  # keep overlapping error bars apart
                xs = [x + dodge for x in xs]
                ax.errorbar(xs, ys, yerr=[lo, hi], capsize=3, label=method, alpha=0.85, **styles[method])
            else:
                s = look.get((task, method, None, "score"))
                if s:
                    ax.axhline(s["mean"], ls=":", lw=1.2, label=f"{method} (no ratio)")
        if task not in LOWER_IS_BETTER:  # fractions of answers found: CI bars are clipped to the possible range
            ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("ratio (fraction of tokens removed)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{task}: score vs. compression ratio")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        made.append(_save(fig, out / f"score_vs_ratio_{_slug(task)}.png"))
        # Pareto: score vs bytes per token (hot bytes when a retrieval method keeps a cold tier)
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        x_key = "hot_bytes_per_token" if has_cold(task_rows) else "bytes_per_token"
        for method in ["full", *methods]:
            pts = sorted(
                (look[(task, method, r, x_key)]["mean"], s["mean"])
                for (t, m, r, k), s in look.items()
                if t == task and m == method and k == "score" and (task, method, r, x_key) in look
            )  # fmt: skip
            if pts:
                xs, ys = zip(*pts, strict=True)
                if method == "full":
                    style = {"color": "black", "marker": "*", "ms": 12, "ls": ""}
                else:  # distinct marker and line style per method: lines lying on each other stay distinguishable
                    style = {**styles[method], "ms": 7, "mfc": "none", "mew": 1.4}
                    if len(xs) == 1:
                        style["ls"] = ""
                ax.plot(xs, ys, label=method, alpha=0.9, **style)
        ax.set_xlabel(
            "hot bytes per context token (at rest + one step's fetch)" if x_key != "bytes_per_token"
            else "cache bytes per context token"
        )  # fmt: skip
        ax.set_ylabel(ylabel)
        ax.set_title(f"{task}: quality vs. memory")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        made.append(_save(fig, out / f"pareto_{_slug(task)}.png"))
        turns = _turns_plot(plt, task, task_rows, look, out / f"turns_{_slug(task)}.png")
        if turns is not None:
            made.append(turns)
    niah = [m for m in _metrics(rows) if m["task"] == "niah" and m["meta"].get("depth") is not None]
    if niah:
        made.append(_heatmap(plt, niah, out / "niah_heatmap.png"))
    made.append(_speed_plot(plt, rows, summary, out / "speed.png"))
    return [p for p in made if p is not None]


def _styles():
    """Marker and line style per series (endless): 48 series before a (marker, line style) pair repeats."""
    for i in count():
        yield {"marker": MARKERS[i % len(MARKERS)], "ls": LINESTYLES[(i + i // len(MARKERS)) % len(LINESTYLES)]}


def _heatmap(plt, metrics: list[dict], path: Path) -> Path:
    """Mean score per needle depth × context length, one panel per method@ratio (one matrix for one length)."""
    import numpy as np

    configs = sorted({(m["method"], m["ratio"]) for m in metrics}, key=lambda x: _order(("", *x)))
    depths = sorted({m["meta"]["depth"] for m in metrics})
    lengths = sorted({m["meta"].get("length") or 0 for m in metrics})

    def grid_for(method, ratio):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                vals = [m["score"] for m in metrics if (m["method"], m["ratio"]) == (method, ratio)
                        and m["meta"]["depth"] == d and (m["meta"].get("length") or 0) == n]  # fmt: skip
                if vals:
                    grid[i, j] = sum(vals) / len(vals)
        return grid

    depth_labels = [f"{d:.0%}" for d in depths]
    if len(lengths) == 1:  # one matrix: depth × method@ratio
        grid = np.concatenate([grid_for(*c) for c in configs], axis=1)
        fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(configs), 1.6 + 0.42 * len(depths)), layout="constrained")
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(configs)), [_label(*c) for c in configs], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(depths)), depth_labels, fontsize=7)
        ax.set_ylabel("needle depth")
        ax.set_title(f"NIAH score by needle depth, {lengths[0]} tokens")
    else:
        cols = min(4, len(configs))
        nrows = math.ceil(len(configs) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(2.8 * cols + 1.2, 2.6 * nrows + 0.8), squeeze=False,
                                 sharex=True, sharey=True, layout="constrained")  # fmt: skip
        for ax in axes.flat[len(configs) :]:
            ax.axis("off")
        for ax, (method, ratio) in zip(axes.flat, configs, strict=False):
            image = ax.imshow(grid_for(method, ratio), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_title(_label(method, ratio), fontsize=8)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), depth_labels, fontsize=7)
        fig.supxlabel("context tokens", fontsize=8)
        fig.supylabel("needle depth", fontsize=8)
        fig.suptitle("NIAH: score by needle depth × context length")
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label="score")
    return _save(fig, path, tight=False)


def _speed_plot(plt, rows: list[dict], summary: list[dict], path: Path) -> Path | None:
    speed = [s for s in summary if s["task"] == "speed"]
    if speed:
        metrics = [("prefill_vs_full", "prefill time"), ("decode_vs_full", "decode tok/s"),
                   ("bytes_vs_full", "bytes held"), ("peak_vs_full", "peak cache bytes")]  # fmt: skip
        title = "speed task: each number ÷ the full cache's (same samples)"
    else:
        speed = summary
        metrics = [("decode_tokens_per_second", "decode tok/s"), ("compression_seconds", "compression s"),
                   ("cache_fraction", "cache bytes ÷ full")]  # fmt: skip
        title = "timings of the sweep (all tasks)"
    look: dict[tuple, list[float]] = defaultdict(list)
    for s in speed:
        look[(_label(s["method"], s["ratio"]), s["metric"])].append(s["mean"])
    one_off = set()
    if not speed or speed[0]["task"] != "speed":  # captured-prefill tasks: shared scoring work is its own bar
        for label, seconds in one_off_seconds(rows).items():
            look[(label, "compression_seconds")].append(seconds)
            one_off.add(label)
    labels = sorted({lab for lab, _ in look}, key=lambda x: (x != "full", x))
    metrics = [(key, name) for key, name in metrics if any(k == key for _, k in look)]  # e.g. no batched tok/s
    if not labels or not metrics:
        return None
    colors = ["black" if lab == "full" else "tab:orange" if lab in one_off else "tab:blue" for lab in labels]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1, 0.28 * len(labels) + 1.8), squeeze=False)
    axes = list(axes[0])
    for ax, (key, name) in zip(axes, metrics, strict=True):
        vals = [sum(look[(lab, key)]) / len(look[(lab, key)]) if look.get((lab, key)) else math.nan for lab in labels]
        ax.barh(range(len(labels)), vals, color=colors)
        ax.set_yticks(range(len(labels)), labels if ax is axes[0] else [""] * len(labels), fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(len(labels) - 0.5, -0.5)  # same rows on every panel (a missing value draws no bar), top down
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def one_off_seconds(rows: list[dict]) -> dict[str, float]:
    """Mean seconds per sample of the work a sample's cells share (e.g. H2O's accumulated attention), by the scorer
    that computed it: ``{"h2o (one-off scoring)": 0.8}``. Rows record it on the cell that paid for it."""
    per_sample: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    for r in rows:
        seconds = r.get("one_off_seconds")
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
            scorer = str(r.get("spec") or r["method"]).split("+")[0]
            per_sample[f"{scorer} (one-off scoring)"][(r["task"], str(r["sample_id"]))] += float(seconds)
    return {label: sum(v.values()) / len(v) for label, v in per_sample.items()}


def _save(fig, path: Path, tight: bool = True) -> Path:
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(out_dir: str | Path, warn: Callable[[str], None] | None = None) -> list[Path]:
    """Write summary.csv, summary.md and the plots for a run directory; return the files written.

    ``warn`` receives one line about skipped malformed lines and superseded duplicate rows. Raises
    ``KVSqueezeError`` when nothing can be reported: no results file, no valid row, or no cell that succeeded (the
    summary listing the failures is still written then)."""
    out = Path(out_dir)
    path = out / RESULTS
    if out.exists() and not out.is_dir():
        raise KVSqueezeError(
            f"{out} is a file, not a run directory; give the --out directory of `kvsqueeze bench`"
            + (f": kvsqueeze report {out.parent}" if out.name == RESULTS else "")
        )
    if not path.is_file():
        raise KVSqueezeError(f"no {RESULTS} in {out}; run `kvsqueeze bench --out {out}` first")
    scan = scan_rows(path)
    all_rows, superseded = latest_rows(scan.rows)
    notes = [scan.summary()] if scan.skipped else []
    if superseded:
        notes.append(f"{superseded} duplicate row(s) of the same cells ignored (the last row of each cell counts)")
    if not all_rows:
        detail = f" ({scan.summary()})" if scan.skipped else ""
        raise KVSqueezeError(f"{path} holds no result rows{detail}; run `kvsqueeze bench --out {out}`")
    if warn is not None and notes:
        warn(f"{path}: " + "; ".join(notes))
    rows = [r for r in all_rows if r.get("status") == "ok"]
    summary = summarize(rows)
    written = [out / "summary.csv", out / "summary.md"]
    try:
        with written[0].open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(summary)
        written[1].write_text(_markdown(rows, all_rows, summary), encoding="utf-8")
        if rows:
            written += _plots(rows, summary, out)
    except OSError as exc:
        raise KVSqueezeError(f"cannot write the report into {out}: {os_reason(exc, out)}") from None
    if not rows:
        first = next((r.get("error") for r in all_rows if r.get("error")), "no error message")
        raise KVSqueezeError(
            f"no cell in {path} succeeded ({len(all_rows)} failed; first: {str(first)[:200]}); see {written[1]}"
        )
    return written
