"""Check decoding over compressed storage on one device: exactness, fast path vs reference, generate, speed, memory.

    python scripts/check_device.py --device cuda          # a tiny random model and the embedded SmolLM2
    python scripts/check_device.py --device cpu --fast    # the tiny model only (what the test suite runs)

For every model (a tiny random-weight Llama built in code; SmolLM2 unless ``--fast``) and method:

- ``none``: logits of a prefill and decode steps through ``CompressedCache(model, "none")`` equal
  ``DynamicCache``'s exactly (max abs diff 0: the same computation);
- every compressed method (ragged ``snapkv+adakv``, ``kivi``, ``kvquant``, ``snapkv+kivi``, a decoding schedule):
  after the prefill and a few decode steps, each layer's attention over its storage (``CompressedLayer.attend``:
  the fused, ragged and packed-code paths) equals a reference that materializes every block and attends head by
  head in float64, within ``8 · eps(dtype) · sqrt(L)`` relative to the output's scale (rounding of sums of ``L``
  terms grows like ``sqrt(L)·eps``; 8× margin); then ``model.generate`` over a fresh cache returns exactly the
  prompt plus the requested tokens and the cache holds fewer tokens (or bytes) than a full one.

It prints one markdown table per model: decode tok/s and memory (the cache's storage bytes and peak; on CUDA the
device's peak allocated memory) vs the full cache, and exits 1 on any mismatch, 2 (one line) for an unavailable
device.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvsqueeze import CompressedCache, KVSqueezeError
from kvsqueeze.calibration.kvquant import fit_kvquant
from kvsqueeze.core.attention_math import merge_partials, partial_attention
from kvsqueeze.core.compat import with_cache
from kvsqueeze.core.layer import CompressedLayer
from kvsqueeze.models import load_model, parse_device

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)  # fmt: skip


def methods(tiny: bool, config: str) -> list[tuple[str, float | None]]:
    """(spec, ratio) of the methods checked; the tiny model's groups and windows fit its short context."""
    if tiny:
        return [("snapkv:window=8+adakv", 0.5), ("kivi:bits=2,residual=16,group=16", None),
                (f"kvquant:bits=3,config={config}", None), ("snapkv:window=8+kivi:bits=2,residual=16,group=16", 0.5),
                ("h2o+interval:every=8,budget=96", None)]  # fmt: skip
    return [("snapkv+adakv", 0.5), ("kivi:bits=2", None), (f"kvquant:bits=3,config={config}", None),
            ("snapkv+kivi:bits=2", 0.5), ("h2o+interval:every=32,budget=512", None)]  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model, cache, ids: torch.Tensor) -> torch.Tensor:
    past = cache.get_seq_length()
    mask = torch.ones(ids.shape[0], past + ids.shape[-1], dtype=torch.long, device=ids.device)
    return model(input_ids=ids, attention_mask=mask, **with_cache(model, cache), use_cache=True).logits[:, -1]


def decode(model, cache, prompt: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], float]:
    """Prefill ``prompt`` then ``steps`` greedy steps; the logits of each forward and the decode seconds."""
    logits = [step(model, cache, prompt)]
    sync(prompt.device)
    start = time.perf_counter()
    for _ in range(steps):
        logits.append(step(model, cache, logits[-1].argmax(-1, keepdim=True)))
    sync(prompt.device)
    return logits, time.perf_counter() - start


def reference_attend(layer: CompressedLayer, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of one decode query over everything ``layer`` holds: blocks materialized, head by head, float64."""
    B, Hq, _, D = query.shape
    H = layer.keys.shape[1]
    G = Hq // H
    q = query.double().reshape(B, H, G, D)
    parts = []
    for block in layer.blocks:
        keys, values = (x.double() for x in block.materialize(torch.float32))
        sizes = block.lengths.flatten().tolist()
        out = torch.zeros(B, H, G, values.shape[-1], dtype=torch.float64, device=query.device)
        lse = torch.full((B, H, G), float("-inf"), dtype=torch.float64, device=query.device)
        for i, (k, v) in enumerate(zip(keys.split(sizes), values.split(sizes), strict=True)):
            if k.shape[0]:
                b, h = divmod(i, H)
                out[b, h], lse[b, h] = partial_attention(q[b, h], k, v, scaling)
        parts.append((out, lse))
    if layer.keys.shape[-2]:
        parts.append(partial_attention(q, layer.keys.double(), layer.values.double(), scaling))
    return merge_partials(parts).view(B, Hq, 1, -1).transpose(1, 2)


def path_error(model, cache, dtype: torch.dtype) -> tuple[float, float]:
    """Largest relative difference between each layer's attention and the reference, and the tolerance."""
    worst, tol = 0.0, 0.0
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    for layer in cache.layers:
        if not isinstance(layer, CompressedLayer) or not layer.compressed:
            continue
        query = torch.randn(1, cfg.num_attention_heads, 1, head_dim, generator=gen).to(model.device, dtype)
        scaling = head_dim**-0.5
        fast = layer.attend(query, None, scaling).double()
        ref = reference_attend(layer, query, scaling)
        held = int(layer.kept_lengths().max())
        tol = max(tol, 8 * torch.finfo(dtype).eps * math.sqrt(held))
        worst = max(worst, float((fast - ref).abs().max()) / max(1.0, float(ref.abs().max())))
    return worst, tol


def check_model(name: str, model, prompt: torch.Tensor, steps: int, config: str, tiny: bool) -> tuple[list, bool]:
    device, dtype = model.device, model.dtype
    rows, ok = [], True

    def memory():
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)

    def peak():
        return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None

    with torch.no_grad():
        dyn_logits, _ = decode(model, DynamicCache(), prompt, steps)
        memory()
        full = CompressedCache(model, "none")
        logits, seconds = decode(model, full, prompt, steps)
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(logits, dyn_logits, strict=True))
        full_rate, full_bytes, full_peak = steps / seconds, full.nbytes(), peak()
        exact = diff == 0.0
        ok &= exact
        rows.append(["none", "", "logits = DynamicCache", f"{diff:.1e}", "0", "ok" if exact else "MISMATCH",
                     f"{full_rate:.1f}", "1.00", f"{full_bytes}", "1.00", "1.00", _fmt(full_peak)])  # fmt: skip
        for spec, ratio in methods(tiny, config):
            memory()
            cache = CompressedCache(model, spec, ratio=ratio)
            _, seconds = decode(model, cache, prompt, steps)
            gpu_peak = peak()
            err, tol = path_error(model, cache, dtype)
            n_bytes, peak_bytes = cache.nbytes(), max(cache.peak_bytes, cache.nbytes())
            fresh = CompressedCache(model, spec, ratio=ratio)
            out = model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                 **with_cache(model, fresh), pad_token_id=0)  # fmt: skip
            stats = fresh.stats()
            lengths = out.shape == (prompt.shape[0], prompt.shape[1] + steps)
            smaller = (
                stats["tokens_kept_mean"] < stats["tokens_seen"] or stats["cache_bytes"] < stats["full_cache_bytes"]
            )
            good = err <= tol and lengths and smaller
            ok &= good
            verdict = "ok" if good else ("MISMATCH" if err > tol else "BAD LENGTH" if not lengths else "NOT COMPRESSED")
            rate = steps / seconds
            short = spec.split(",config=")[0]
            rows.append([short, "" if ratio is None else f"{ratio:g}", "attend = reference", f"{err:.1e}", f"{tol:.1e}",
                         verdict, f"{rate:.1f}", f"{rate / full_rate:.2f}", f"{n_bytes}", f"{n_bytes / full_bytes:.2f}",
                         f"{peak_bytes / full_bytes:.2f}",
                         gpu_cell(gpu_peak, full_peak)])  # fmt: skip
    return rows, ok


def _fmt(n) -> str:
    return "—" if n is None else f"{n / 2**20:.1f} MiB"


def gpu_cell(peak: int | None, full: int | None) -> str:
    """The device's peak allocated memory (model included) and its ratio to the full cache's run."""
    return _fmt(peak) + (f" ({peak / full:.2f})" if peak and full else "")


def table(title: str, rows: list) -> str:
    head = ["method", "ratio", "check", "max diff", "tolerance", "result", "decode tok/s", "vs full", "cache bytes",
            "vs full", "peak cache vs full", "GPU peak"]  # fmt: skip
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps | auto")
    parser.add_argument("--fast", action="store_true", help="the tiny model only, short context")
    parser.add_argument("--context", type=int, default=2048, help="SmolLM2 prompt tokens (default 2048)")
    parser.add_argument("--steps", type=int, default=0, help="decode steps (default 8 with --fast, else 32)")
    parser.add_argument("--dtype", default="float32", help="SmolLM2's dtype (float32, bfloat16, float16)")
    args = parser.parse_args(argv)
    try:
        device = parse_device(args.device)
        dtype = getattr(torch, args.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise KVSqueezeError(f"unknown dtype {args.dtype!r}; use float32, bfloat16 or float16")
    except KVSqueezeError as exc:
        print(f"check_device: error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    steps = args.steps or (8 if args.fast else 32)
    print(f"device {device} · torch {torch.__version__} · {steps} decode steps\n")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tiny = LlamaForCausalLM(LlamaConfig(**TINY)).eval().to(device)
        models = [("tiny llama (random weights, float32)", tiny, 192, True, None)]
        if not args.fast:
            smol, tok = load_model(None, dtype=args.dtype, device=str(device))
            models.append((f"SmolLM2 ({args.dtype}, {args.context} tokens)", smol.eval(), args.context, False, tok))
        for title, model, length, is_tiny, tok in models:
            config = Path(tmp) / f"kvquant-{len(title)}.json"
            config.write_text(json.dumps(fit_kvquant(model, tok, n_tokens=64 if is_tiny else 256)))
            vocab = model.config.vocab_size
            prompt = torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(1)).to(device)
            rows, good = check_model(title, model, prompt, steps, str(config), is_tiny)
            ok &= good
            print(table(title, rows))
    print("all checks passed" if ok else "MISMATCH: see the table(s) above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
