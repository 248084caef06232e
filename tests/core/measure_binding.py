"""Decode speed of method ``none`` through ``CompressedCache`` vs transformers' ``DynamicCache`` on the embedded
SmolLM2 at a 2k-token context, interleaved in one run (issue 10: the binding must cost nothing; not collected by
pytest).

    .venv/bin/python -m tests.core.measure_binding --tokens 2048 --steps 48 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

import kvsqueeze as kvs
from kvsqueeze.core.compat import with_cache
from kvsqueeze.data import haystack


def decode_rate(model, cache, context: torch.Tensor, steps: int) -> float:
    """Tokens per second of ``steps`` greedy single-token forwards after prefilling ``context``."""
    with torch.no_grad():
        out = model(input_ids=context, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(input_ids=token, **with_cache(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
        return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = kvs.load_model()
    context = tok(haystack(tok, args.tokens + 100), return_tensors="pt").input_ids[:, : args.tokens]
    ours, theirs = [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        theirs.append(decode_rate(model, DynamicCache(config=model.config), context, args.steps))
        ours.append(decode_rate(model, kvs.CompressedCache(model, "none"), context, args.steps))
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    print(
        f"DynamicCache {statistics.median(theirs):.2f} tok/s, CompressedCache('none') {statistics.median(ours):.2f}"
        f" tok/s; ratio median {statistics.median(ratios):.3f} (per repeat {', '.join(f'{r:.3f}' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
