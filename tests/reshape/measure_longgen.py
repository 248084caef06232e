"""Issue-5 numbers for decoding-time schedules on SmolLM2 (not collected by pytest).

Greedy 1,000-token continuation of an essay opening with the full cache, then each method teacher-forced over it
(``kvsqueeze.bench.evaluators.longgen``): top-1 agreement, KL(full ‖ method), tokens held per KV head at the end,
bytes, and decode tok/s relative to the full cache measured in the same run.

    .venv/bin/python tests/reshape/measure_longgen.py --out docs/results/reshape/longgen.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvsqueeze.bench.evaluators import longgen
from kvsqueeze.bench.text import essay_stream
from kvsqueeze.models import load_model

METHODS = [
    "h2o+interval:every=16,budget=256",
    "lazyeviction:budget=256,window=16",
    "triattention:budget=256,every=16",
    "snapkv+interval:every=16,budget=256",
    "streaming_llm+interval:every=16,budget=256",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("docs/results/reshape/longgen.jsonl"))
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--essay", type=int, default=0)
    parser.add_argument("--methods", default=",".join(m.replace(",", ";") for m in METHODS))
    args = parser.parse_args()
    model, tok = load_model()
    ids, starts = essay_stream(tok)
    start = starts[args.essay]
    prompt = torch.tensor([ids[start : start + args.prompt_tokens]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    reference = None
    with args.out.open("w") as fh:
        for method in [m.replace(";", ",") for m in args.methods.split(",")]:
            res = longgen(model, tok, method, prompt, n_tokens=args.tokens, reference=reference)
            reference = res.pop("reference")
            res["wall_seconds_total"] = time.perf_counter() - t0
            fh.write(json.dumps(res) + "\n")
            fh.flush()
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
