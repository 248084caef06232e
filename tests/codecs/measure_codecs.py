"""Measure codecs on SmolLM2 at ~2k context tokens: effective bits, decode speed vs the full cache, KL fidelity.

Run: ``.venv/bin/python -m tests.codecs.measure_codecs [--tokens 2048] [--steps 64] [SPEC ...]``

For each spec the context is prefilled (and compressed), then a 64-token continuation of the same essay text
is teacher-forced one token at a time through the compressed cache (the decode path). Reported:

- ``bits``: 8 × cache bytes / key-value elements held after prefill (all metadata and the full-precision tail);
- ``tok/s`` and ``ratio``: teacher-forced decode steps per second, and relative to a full cache stepped in
  alternation with it (same machine load; the machine is shared);
- ``KL``: mean KL(full ‖ method) of the next-token distributions over the continuation.
"""

from __future__ import annotations

import argparse
import time

import torch

from kvsqueeze import CompressedCache
from kvsqueeze.core.layer import CompressedLayer
from kvsqueeze.data import essays
from kvsqueeze.models import load_model

DEFAULT = [
    "int:bits=4",
    "int:bits=2",
    "kivi:bits=2",
    "kivi:bits=2,residual=0",
    "kivi:bits=4",
    "fp8",
    "qjl",
    "gear:bits=2",
    "rotatekv",
]


def held_elements(cache: CompressedCache) -> int:
    total = 0
    for layer in cache.layers:
        if isinstance(layer, CompressedLayer):
            total += 2 * int(layer.kept_lengths().sum()) * layer.keys.shape[-1]
    return total


def run(model, ids: torch.Tensor, n_ctx: int, spec: str):
    """Prefill a full cache and a ``spec`` cache, then teacher-force both step by step, alternating, so that both
    see the same machine load: (bits, method tok/s, full tok/s, KL, method bytes, full bytes)."""
    full, cache = CompressedCache(model, "none"), CompressedCache(model, spec)
    times = {"full": 0.0, "method": 0.0}
    kls = []
    with torch.no_grad():
        model(ids[:, :n_ctx], past_key_values=full, use_cache=True)
        model(ids[:, :n_ctx], past_key_values=cache, use_cache=True)
        bits = 8 * cache.nbytes() / held_elements(cache)
        for t in range(n_ctx, ids.shape[1]):
            step = {}
            for name, c in (("full", full), ("method", cache)):
                start = time.perf_counter()
                logits = model(ids[:, t : t + 1], past_key_values=c, use_cache=True).logits[:, -1]
                times[name] += time.perf_counter() - start
                step[name] = torch.log_softmax(logits.float(), -1)
            kls.append(float((step["full"].exp() * (step["full"] - step["method"])).sum()))
    n = ids.shape[1] - n_ctx
    return bits, n / times["method"], n / times["full"], sum(kls) / len(kls), cache.nbytes(), full.nbytes()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("specs", nargs="*", default=DEFAULT)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    text = "\n\n".join(essays()[:6])
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens + args.steps]
    n_ctx = ids.shape[1] - args.steps
    print(f"context {n_ctx} tokens, {args.steps} teacher-forced steps, threads {args.threads}")
    print(f"{'method':32s} {'bits':>6s} {'MB':>7s} {'full MB':>7s} {'tok/s':>7s} {'full':>7s} {'ratio':>6s} {'KL':>9s}")
    for spec in args.specs:
        bits, rate, base, kl, nbytes, fbytes = run(model, ids, n_ctx, spec)
        print(
            f"{spec:32s} {bits:6.2f} {nbytes / 1e6:7.2f} {fbytes / 1e6:7.2f} {rate:7.2f} {base:7.2f} "
            f"{rate / base:6.2f} {kl:9.5f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
