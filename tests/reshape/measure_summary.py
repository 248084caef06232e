"""Tables of issue 5's numbers from the runs under ``docs/results/reshape/`` (not collected by pytest).

    .venv/bin/python tests/reshape/measure_summary.py            # prints markdown tables

Fidelity: each method's bytes (fraction of the full cache) next to ``snapkv`` and ``streaming_llm`` at the ratio
whose bytes are closest (same bytes = same ratio for eviction methods). Longgen: one row per method.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

ROOT = Path("docs/results/reshape")
BASELINES = ("snapkv", "streaming_llm")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def fidelity_table(path: Path) -> str:
    cells: dict[tuple[str, float | None], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("error") or row["method"] == "full":
            continue
        cell = cells[(row["method"], row["ratio"])]
        cell["bytes"].append(row["cache_bytes"] / row["full_bytes"])
        cell["kl"].append(row["scores"]["kl"])
        cell["top1"].append(row["scores"]["top1"])
    agg = {key: {k: _mean(v) for k, v in val.items()} | {"n": len(val["kl"])} for key, val in cells.items()}

    def closest(base: str, frac: float) -> str:
        options = [(abs(v["bytes"] - frac), k, v) for k, v in agg.items() if k[0] == base]
        if not options:
            return "–"
        _, key, v = min(options, key=lambda o: o[0])
        return f"{v['kl']:.4f} / {v['top1']:.3f} (@{key[1]}, {v['bytes']:.2f})"

    lines = [
        "| method | ratio | bytes / full | KL (nats) | top-1 | snapkv at ≈ same bytes: KL / top-1 | "
        "streaming_llm at ≈ same bytes: KL / top-1 | samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, ratio), v in sorted(agg.items(), key=lambda kv: (kv[0][0] in BASELINES, kv[0][0], kv[0][1] or 0)):
        r = "–" if ratio is None else f"{ratio}"
        lines.append(
            f"| `{method}` | {r} | {v['bytes']:.3f} | {v['kl']:.4f} | {v['top1']:.3f} | "
            f"{closest('snapkv', v['bytes'])} | {closest('streaming_llm', v['bytes'])} | {v['n']} |"
        )
    return "\n".join(lines)


def longgen_table(path: Path) -> str:
    lines = [
        "| method | tokens held per KV head at the end | bytes / full | top-1 agreement | KL mean | KL max | "
        "decode tok/s (method / full) | relative speed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for line in path.read_text().splitlines():
        r = json.loads(line)
        lines.append(
            f"| `{r['method']}` | {r['tokens_held_end']:.0f} of {r['prompt_tokens'] + r['generated_tokens'] - 1} | "
            f"{r['cache_bytes'] / r['full_cache_bytes']:.3f} | {r['top1_agreement']:.3f} | {r['kl_mean']:.4f} | "
            f"{r['kl_max']:.3f} | {r['decode_tok_s']:.2f} / {r['full_decode_tok_s']:.2f} | "
            f"{r['relative_speed']:.2f}× |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    fid = ROOT / "fidelity" / "results.jsonl"
    if fid.exists():
        print(fidelity_table(fid), end="\n\n")
    for name in sorted(ROOT.glob("longgen*.jsonl")):
        print(f"{name.name}\n")
        print(longgen_table(name), end="\n\n")
