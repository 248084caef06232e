"""Word needles, question-agnostic, retrieval methods vs the full cache at a hot-byte budget (issue 15).

Each sample's context is prefilled once (``bench.capture``); every method × ratio is built from it, the question is
appended and answered greedily. Reported per cell: the fraction of the needles the full cache finds that the method
also finds, and the hot bytes actually used (hot storage after the context + bytes fetched per decoding step,
measured over the answer's steps) over the full cache's bytes.

    PYTHONPATH=src python scripts/retrieval_needles.py --samples 16 --length 1536 --threads 1 \
        --methods quest,a2ats,actqkv,icecache,snapkv --ratios 0.75,0.875
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvsqueeze.bench import scoring
from kvsqueeze.bench.capture import build_cache, capture_prefill, eos_ids, forward, greedy
from kvsqueeze.bench.tasks import generate, parse_tasks
from kvsqueeze.models import load_model
from kvsqueeze.prompts import prompt_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--length", type=int, default=1536)
    ap.add_argument("--methods", default="quest,a2ats,actqkv,icecache")
    ap.add_argument("--ratios", default="0.75,0.875")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--task", default="niah:single-words", help="a niah variant with one scored question")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    eos = eos_ids(model, tok)
    methods = [m for m in args.methods.split(",") if m and m != "none"]  # "none": the full cache only
    cells = [("none", None)] + [(m, float(r)) for m in methods for r in args.ratios.split(",")]
    rows = []
    (task,) = parse_tasks(args.task)
    for sample in generate(task, tok, samples=args.samples, length=args.length, seed=args.seed):
        q = sample.questions[0]
        ctx, question = prompt_ids(tok, sample.context, q.text, q.answer_prefix)
        prefill = capture_prefill(model, ctx)
        for spec, ratio in cells:
            start = time.perf_counter()
            cache = build_cache(model, prefill, spec, ratio, tok)
            hot = cache.nbytes(tier="hot") - cache.tokens.numel() * cache.tokens.element_size()
            full = cache.full_nbytes()
            first = forward(model, cache, question, keep=1)[-1]
            answers = q.answers

            def done(toks: list[int], answers=answers) -> bool:
                return scoring.all_found(tok.decode(toks, skip_special_tokens=True), answers)

            meter = cache.fetch_meter
            before = meter.fetched_bytes, meter.tokens  # the question's forward fetches once for all its tokens
            out = greedy(model, cache, first, q.max_new_tokens, eos, done)
            text = tok.decode(out.tokens, skip_special_tokens=True).strip()
            steps = meter.tokens - before[1]
            fetched = (meter.fetched_bytes - before[0]) / steps if steps else 0.0  # per decoding step
            rows.append({"sample": sample.id, "seed": args.seed, "method": spec, "ratio": ratio,
                         "score": scoring.match(text, q.answers), "hot_fraction": (hot + fetched) / full,
                         "hot_bytes": hot, "fetched_per_token": fetched,
                         "full_bytes": full, "output": text, "seconds": time.perf_counter() - start})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    found = {r["sample"] for r in rows if r["method"] == "none" and r["score"] == 1.0}
    print(f"full cache finds {len(found)} of {args.samples}")
    print("| method | ratio | kept of the full cache's answers | hot bytes / full (mean) |")
    print("|---|---|---|---|")
    for spec, ratio in cells[1:]:
        mine = [r for r in rows if r["method"] == spec and r["ratio"] == ratio]
        kept = sum(r["score"] == 1.0 for r in mine if r["sample"] in found)
        frac = sum(r["hot_fraction"] for r in mine) / max(len(mine), 1)
        print(f"| {spec} | {ratio} | {kept}/{len(found)} | {frac:.3f} |")


if __name__ == "__main__":
    main()
