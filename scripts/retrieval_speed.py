"""Decode tokens/s of retrieval methods (cold tier in RAM or on disk) vs the full cache, one context (issue 15).

The context (essays) is prefilled once per method; then ``--tokens`` greedy steps are timed (teacher-forced on the
full cache's tokens so every method decodes the same sequence).

    PYTHONPATH=src python scripts/retrieval_speed.py --length 4096 --ratio 0.875 --threads 1 \
        --methods quest,a2ats,actqkv,icecache,leoam
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from kvsqueeze import CompressedCache
from kvsqueeze.bench.capture import forward
from kvsqueeze.data import haystack
from kvsqueeze.models import load_model


def timed(model, cache, ids: torch.Tensor, follow: torch.Tensor) -> float:
    cache.prefill(model, ids)
    forward(model, cache, follow[:, :1], keep=1)  # warm-up step
    start = time.perf_counter()
    for i in range(1, follow.shape[-1]):
        forward(model, cache, follow[:, i : i + 1], keep=1)
    return (follow.shape[-1] - 1) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--ratio", type=float, default=0.875)
    ap.add_argument("--tokens", type=int, default=33)
    ap.add_argument("--methods", default="quest,a2ats,actqkv,icecache,leoam")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    ids = tok(haystack(tok, args.length), return_tensors="pt", add_special_tokens=False).input_ids[:, : args.length]
    follow = torch.randint(3, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    full = timed(model, CompressedCache(model, "none"), ids, follow)
    print("| method | tier | ratio | decode tok/s | vs full |\n|---|---|---|---|---|")
    print(f"| full | - | - | {full:.2f} | 1.00 |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.methods.split(","):
            for tier in ("ram", "disk"):
                method = f"{spec}:tier=disk,dir={tmp}" if tier == "disk" else spec
                speed = timed(model, CompressedCache(model, method, ratio=args.ratio), ids, follow)
                print(f"| {spec} | {tier} | {args.ratio} | {speed:.2f} | {speed / full:.2f} |", flush=True)


if __name__ == "__main__":
    main()
