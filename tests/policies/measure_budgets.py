"""Measure budget / head-selection methods on SmolLM2 (not collected by pytest: no ``test_`` prefix).

Fidelity: a 2k-token essay context is compressed, then a 64-token continuation is teacher-forced in one forward
over a fork of the compressed cache; compared with the full cache: mean KL(full || compressed) of the
next-token distributions and top-1 agreement. Bytes: ``cache.nbytes()`` after the context prefill.
Speed: greedy decode tok/s from a ragged cache (``snapkv+adakv``) vs a uniform cache of the same total size
(``snapkv``, same ratio), interleaved repeats, median.

    .venv/bin/python -m tests.policies.measure_budgets --ratios 0.5 0.75 0.9 --methods snapkv snapkv+adakv
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvsqueeze import CompressedCache, load_model
from kvsqueeze.data import haystack


def context_and_continuation(tokenizer, n_ctx: int, n_cont: int) -> tuple[torch.Tensor, torch.Tensor]:
    text = haystack(tokenizer, n_ctx + n_cont + 16)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, : n_ctx + n_cont]
    return ids[:, :n_ctx], ids[:, n_ctx:]


@torch.no_grad()
def full_logits(model, ctx: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
    cache = CompressedCache(model, "none")
    model(input_ids=ctx, past_key_values=cache)
    return model(input_ids=cont, past_key_values=cache).logits[0].float()


@torch.no_grad()
def fidelity(model, method: str, ratio: float, ctx, cont, reference: torch.Tensor) -> dict:
    cache = CompressedCache(model, method, ratio=ratio)
    start = time.perf_counter()
    cache.prefill(model, ctx)
    prefill_s = time.perf_counter() - start
    held = cache.nbytes()
    logits = model(input_ids=cont, past_key_values=cache.fork()).logits[0].float()
    logp_ref = torch.log_softmax(reference, -1)
    logp = torch.log_softmax(logits, -1)
    kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1).mean().item()
    top1 = (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()
    return {"kl": kl, "top1": top1, "bytes": held, "full_bytes": cache.full_nbytes(), "prefill_s": prefill_s}


@torch.no_grad()
def decode_rate(model, cache: CompressedCache, first: torch.Tensor, steps: int) -> float:
    twin = cache.fork()
    token = first
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(input_ids=token, past_key_values=twin).logits
        token = logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - start)


def speed(model, ctx, ratio: float, uniform: str, ragged: str, steps: int, repeats: int) -> dict:
    caches = {}
    for method in (uniform, ragged):
        cache = CompressedCache(model, method, ratio=ratio)
        cache.prefill(model, ctx)
        caches[method] = cache
    lengths = [int(layer.kept_lengths().sum()) for layer in caches[ragged].layers]
    first = ctx[:, -1:]
    rates: dict[str, list[float]] = {uniform: [], ragged: []}
    for _ in range(repeats):
        for method in (uniform, ragged):
            rates[method].append(decode_rate(model, caches[method], first, steps))
    u, r = statistics.median(rates[uniform]), statistics.median(rates[ragged])
    return {
        "uniform_tok_s": u,
        "ragged_tok_s": r,
        "ratio": r / u,
        "uniform_bytes": caches[uniform].nbytes(),
        "ragged_bytes": caches[ragged].nbytes(),
        "ragged_tokens": sum(lengths),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=64)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--methods", nargs="*", default=["snapkv", "snapkv+adakv", "snapkv+pyramidkv"])
    parser.add_argument("--speed", action="store_true", help="also measure ragged vs uniform decode tok/s")
    parser.add_argument("--ragged", default="snapkv+adakv")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(dtype=args.dtype)
    ctx, cont = context_and_continuation(tokenizer, args.tokens, args.continuation)
    print(f"context {ctx.shape[1]} tokens, continuation {cont.shape[1]} tokens, dtype {args.dtype}")
    if args.methods:
        reference = full_logits(model, ctx, cont)
        print(f"{'method':42s} {'ratio':>5s} {'KL':>8s} {'top1':>6s} {'MB held':>8s} {'MB full':>8s} {'prefill':>7s}")
        for ratio in args.ratios:
            for method in args.methods:
                row = fidelity(model, method, ratio, ctx, cont, reference)
                print(
                    f"{method:42s} {ratio:5.2f} {row['kl']:8.4f} {row['top1']:6.3f} {row['bytes'] / 1e6:8.2f} "
                    f"{row['full_bytes'] / 1e6:8.2f} {row['prefill_s']:6.1f}s",
                    flush=True,
                )
    if args.speed:
        for ratio in args.ratios:
            row = speed(model, ctx, ratio, "snapkv", args.ragged, args.steps, args.repeats)
            print(
                f"decode ratio {ratio}: uniform snapkv {row['uniform_tok_s']:.2f} tok/s ({row['uniform_bytes']} B), "
                f"ragged {args.ragged} {row['ragged_tok_s']:.2f} tok/s ({row['ragged_bytes']} B) "
                f"-> {row['ratio']:.3f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
