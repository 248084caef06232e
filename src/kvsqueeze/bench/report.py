"""Tables and plots from ``results.jsonl`` (``kvsqueeze report DIR`` re-renders them without any model work).

Outputs in the run directory:

- ``summary.csv`` — long format: task, method, ratio, metric, n, mean, ci95 (half-width of a 95 % Student-t
  interval over samples) for every score, bytes per token, cache fraction and timing;
- ``summary.md`` — per task: the primary score (mean ± 95 % CI) per method × ratio, bytes, and speed tables;
- ``score_vs_ratio_<task>.png``, ``pareto_<task>.png`` (score vs cache bytes per token: quantized and evicting
  methods compared at equal bytes), ``niah_heatmap.png`` (score by depth × length), ``speed.png``.

Speed rows are also divided by the full cache's row of the same sample (``*_vs_full``).
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from pathlib import Path

from kvsqueeze.bench.runner import RESULTS, read_rows
from kvsqueeze.bench.scoring import mean_ci
from kvsqueeze.errors import KVSqueezeError

LOWER_IS_BETTER = {"ppl": "perplexity", "fidelity": "KL(full ‖ compressed), nats"}
SCORE_LABELS = {"longgen": "top-1 agreement with the full cache's generation (higher is better)"}
_EXTRA = ("bytes_per_token", "cache_fraction", "compression_seconds", "decode_tokens_per_second", "prefill_seconds",
          "tokens_kept_mean", "decode_vs_full")  # fmt: skip
_SPEED = ("prefill_vs_full", "decode_vs_full", "bytes_vs_full", "rss_vs_full", "peak_rss_bytes", "rss_delta_bytes")


def _label(method: str, ratio) -> str:
    return method if ratio is None else f"{method}@{ratio:g}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _metrics(rows: list[dict]) -> list[dict]:
    """Flatten each ok row into numbers (scores + bytes + timings + speed ratios vs. the full cache)."""
    full = {(r["task"], r["sample_id"]): r for r in rows if r["method"] == "full"}
    out = []
    for r in rows:
        m = {k: v for k, v in r.get("scores", {}).items() if isinstance(v, (int, float))}
        for k in _EXTRA:
            if isinstance(r.get(k), (int, float)):
                m[k] = r[k]
        if r.get("full_bytes"):
            m["cache_fraction"] = r["cache_bytes"] / r["full_bytes"]
        ref = full.get((r["task"], r["sample_id"]))
        if r["task"] == "speed" and ref is not None:
            for name, key in (("prefill_vs_full", "prefill_seconds"), ("decode_vs_full", "decode_tokens_per_second"),
                              ("bytes_vs_full", "cache_bytes"), ("rss_vs_full", "rss_delta_bytes")):  # fmt: skip
                if ref.get(key):
                    m[name] = r[key] / ref[key]
            for key in ("peak_rss_bytes", "rss_delta_bytes"):
                m[key] = r.get(key)
        out.append({"task": r["task"], "method": r["method"], "ratio": r["ratio"], "meta": r.get("meta", {}), **m})
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Mean ± 95 % CI per task × method × ratio × metric."""
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for m in _metrics(rows):
        key = (m["task"], m["method"], m["ratio"])
        for name, value in m.items():
            if name not in ("task", "method", "ratio", "meta") and isinstance(value, (int, float)):
                groups[key][name].append(float(value))
    out = []
    for (task, method, ratio), metrics in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        for name, values in sorted(metrics.items()):
            mean, ci = mean_ci(values)
            out.append({"task": task, "method": method, "ratio": ratio, "metric": name, "n": len(values),
                        "mean": mean, "ci95": ci})  # fmt: skip
    return out


def _order(key: tuple) -> tuple:
    task, method, ratio = key
    return (task, method != "full", method, -1.0 if ratio is None else ratio)


def _fmt(mean: float, ci: float) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    digits = 3 if abs(mean) < 10 else 1
    return f"{mean:.{digits}f} ± {ci:.{digits}f}"


def _lookup(summary: list[dict]) -> dict:
    return {(s["task"], s["method"], s["ratio"], s["metric"]): s for s in summary}


def _markdown(rows: list[dict], all_rows: list[dict], summary: list[dict]) -> str:
    look = _lookup(summary)
    first = rows[0] if rows else (all_rows[0] if all_rows else {})
    lines = ["# kvsqueeze benchmark results", ""]
    lines.append(
        f"model `{first.get('model')}` · dtype `{first.get('dtype')}` · {first.get('mode')} · seed {first.get('seed')}"
        f" · commit `{(first.get('git_commit') or 'unknown')[:10]}` · "
        + ", ".join(f"{k} {v}" for k, v in (first.get("versions") or {}).items())
    )
    lines.append("")
    lines.append("Scores are means over samples ± the half-width of a 95 % Student-t confidence interval. ")
    lines.append("`ratio` is the fraction of context tokens removed; `full` is the uncompressed cache.")
    lines.append("")
    errors = [r for r in all_rows if r.get("status") != "ok"]
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        methods = sorted({r["method"] for r in task_rows}, key=lambda m: (m != "full", m))
        ratios = sorted({r["ratio"] for r in task_rows if r["ratio"] is not None})
        n = len({r["sample_id"] for r in task_rows})
        what = LOWER_IS_BETTER.get(task) or SCORE_LABELS.get(
            task, "score (fraction of expected answers found; higher is better)"
        )
        lines += [f"## {task} ({n} samples) — {what}", ""]
        if task in LOWER_IS_BETTER:
            lines += ["lower is better", ""]
        header = ["method", *(f"ratio {r:g}" for r in ratios), "no ratio"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method in methods:
            cells = []
            for ratio in [*ratios, None]:
                s = look.get((task, method, ratio, "score"))
                cells.append(_fmt(s["mean"], s["ci95"]) if s else "")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", "Cache bytes per context token (mean):", ""]
        lines += ["| method | " + " | ".join(f"ratio {r:g}" for r in ratios) + " | no ratio |"]
        lines += ["|" + "---|" * (len(ratios) + 2)]
        for method in methods:
            cells = []
            for ratio in [*ratios, None]:
                s = look.get((task, method, ratio, "bytes_per_token"))
                cells.append(f"{s['mean']:.0f}" if s else "")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        if task == "longgen":
            lines += _longgen_table(task_rows, look)
    speed = [s for s in summary if s["task"] == "speed" and s["metric"] in _SPEED[:4]]
    if speed:
        lines += ["## speed vs. the full cache (ratios; < 1 = less time / fewer bytes)", ""]
        lines += [
            "| method | ratio | prefill time | decode tok/s | bytes held | RSS growth |",
            "|---|---|---|---|---|---|",
        ]
        for method, ratio in sorted({(s["method"], s["ratio"]) for s in speed}, key=lambda x: _order(("", *x))):
            cells = [look.get(("speed", method, ratio, k)) for k in _SPEED[:4]]
            lines.append(
                f"| {method} | {'' if ratio is None else ratio} | "
                + " | ".join(_fmt(c["mean"], c["ci95"]) if c else "" for c in cells)
                + " |"
            )
        lines.append("")
    if errors:
        lines += [f"## failed cells ({len(errors)})", ""]
        seen = set()
        for r in errors:
            key = (r["task"], r["method"], r.get("error"))
            if key not in seen:
                seen.add(key)
                lines.append(f"- {r['task']} {_label(r['method'], r['ratio'])}: {r.get('error')}")
        lines.append("")
    return "\n".join(lines)


def _longgen_table(task_rows: list[dict], look: dict) -> list[str]:
    """Per method × ratio: KL, tokens held per KV head at the end, decode tok/s ÷ the full cache's."""
    lines = ["Long generation: mean KL(full ‖ compressed) in nats, tokens held per KV head at the end, decode "
             "tokens/s ÷ the full cache's (same samples):", "",
             "| method | ratio | KL | tokens held | decode vs full |", "|---|---|---|---|---|"]  # fmt: skip
    for method, ratio in sorted({(r["method"], r["ratio"]) for r in task_rows}, key=lambda x: _order(("", *x))):
        cells = [look.get(("longgen", method, ratio, k)) for k in ("kl", "tokens_kept_mean", "decode_vs_full")]
        lines.append(f"| {method} | {'' if ratio is None else ratio} | "
                     + " | ".join(_fmt(c["mean"], c["ci95"]) if c else "" for c in cells) + " |")  # fmt: skip
    return [*lines, ""]


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
        for i, method in enumerate(methods):
            pts = sorted(
                (s["ratio"], s["mean"], s["ci95"]) for (t, m, r, k), s in look.items()
                if t == task and m == method and k == "score" and r is not None
            )  # fmt: skip
            if pts:
                xs, ys, es = zip(*pts, strict=True)
                dodge = (i - (len(methods) - 1) / 2) * 0.006  # keep overlapping error bars apart
                xs = [x + dodge for x in xs]
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method, alpha=0.85)
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
        # Pareto: score vs bytes per token
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for method in ["full", *methods]:
            pts = sorted(
                (look[(task, method, r, "bytes_per_token")]["mean"], s["mean"])
                for (t, m, r, k), s in look.items()
                if t == task and m == method and k == "score" and (task, method, r, "bytes_per_token") in look
            )  # fmt: skip
            if pts:
                xs, ys = zip(*pts, strict=True)
                style = {"color": "black", "marker": "*", "ms": 12} if method == "full" else {"marker": "o"}
                ax.plot(xs, ys, ls="-" if len(xs) > 1 else "", label=method, **style)
        ax.set_xlabel("cache bytes per context token")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{task}: quality vs. memory")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        made.append(_save(fig, out / f"pareto_{_slug(task)}.png"))
    niah = [m for m in _metrics(rows) if m["task"] == "niah" and m["meta"].get("depth") is not None]
    if niah:
        made.append(_heatmap(plt, niah, out / "niah_heatmap.png"))
    made.append(_speed_plot(plt, rows, summary, out / "speed.png"))
    return [p for p in made if p is not None]


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
                   ("bytes_vs_full", "bytes held"), ("rss_vs_full", "RSS growth")]  # fmt: skip
        title = "speed task: each number ÷ the full cache's (same samples)"
    else:
        speed = summary
        metrics = [("decode_tokens_per_second", "decode tok/s"), ("compression_seconds", "compression s"),
                   ("cache_fraction", "cache bytes ÷ full")]  # fmt: skip
        title = "timings of the sweep (all tasks)"
    look: dict[tuple, list[float]] = defaultdict(list)
    for s in speed:
        look[(_label(s["method"], s["ratio"]), s["metric"])].append(s["mean"])
    labels = sorted({lab for lab, _ in look}, key=lambda x: (x != "full", x))
    metrics = [(key, name) for key, name in metrics if any(k == key for _, k in look)]  # e.g. no batched tok/s
    if not labels or not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1, 0.28 * len(labels) + 1.8), squeeze=False)
    axes = list(axes[0])
    for ax, (key, name) in zip(axes, metrics, strict=True):
        vals = [sum(look[(lab, key)]) / len(look[(lab, key)]) if look.get((lab, key)) else 0.0 for lab in labels]
        ax.barh(range(len(labels)), vals, color=["black" if lab == "full" else "tab:blue" for lab in labels])
        ax.set_yticks(range(len(labels)), labels if ax is axes[0] else [""] * len(labels), fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _save(fig, path: Path, tight: bool = True) -> Path:
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(out_dir: str | Path) -> list[Path]:
    """Write summary.csv, summary.md and the plots for a run directory; return the files written."""
    out = Path(out_dir)
    path = out / RESULTS
    if not path.is_file():
        raise KVSqueezeError(f"no {RESULTS} in {out}; run `kvsqueeze bench --out {out}` first")
    all_rows = read_rows(path)
    rows = [r for r in all_rows if r.get("status") == "ok"]
    summary = summarize(rows)
    written = [out / "summary.csv", out / "summary.md"]
    with written[0].open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["task", "method", "ratio", "metric", "n", "mean", "ci95"])
        w.writeheader()
        w.writerows(summary)
    written[1].write_text(_markdown(rows, all_rows, summary), encoding="utf-8")
    if rows:
        written += _plots(rows, summary, out)
    return written
