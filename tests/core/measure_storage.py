"""Issue 18's table re-measured: what a cache reports (``nbytes()``) against the tensor storage really alive, on the
embedded SmolLM2 (fp32) with a 4,096-token context, in the documented query-agnostic use (prefill, answer one
question from a fork), plus the peak cache storage during a prefill at ratio 0.75 (not collected by pytest).

    .venv/bin/python -m tests.core.measure_storage --tokens 4096
"""

from __future__ import annotations

import argparse
import gc

import torch

import kvsqueeze as kvs
from kvsqueeze.data import haystack
from tests.core.test_bytes_are_storage import reachable_storage

METHODS = [
    ("snapkv", 0.75), ("snapkv+adakv", 0.75), ("kivi:bits=2", None), ("knorm+kivi:bits=2", 0.75),
    ("think", None), ("minicache", None), ("snapkv+think", 0.75),
]  # fmt: skip
MiB = 2**20


def process_storage(model) -> int:
    """Bytes of every tensor storage alive in the process except the model's parameters and buffers."""
    gc.collect()
    total, seen = 0, set()
    own = {(t.untyped_storage().data_ptr()) for t in [*model.parameters(), *model.buffers()]}
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor:
            s = obj.untyped_storage()
            if s.nbytes() and s.data_ptr() not in own and s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tok = kvs.load_model()
    context = tok(haystack(tok, args.tokens + 200), return_tensors="pt").input_ids[:, : args.tokens]
    question = tok("\n\nWhat is the text above about?", return_tensors="pt", add_special_tokens=False).input_ids
    prompt = torch.cat([context, question], dim=-1)
    baseline = process_storage(model)
    print("| method | ratio | `nbytes()` | live storage after prefill | after answering one question | full cache |"
          " peak during prefill / full |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for spec, ratio in METHODS:
        cache = kvs.CompressedCache(model, spec, ratio=ratio)
        cache.prefill(model, context)
        reported, reachable = cache.nbytes(), reachable_storage(cache)
        fork = cache.fork()
        model.generate(prompt, past_key_values=fork, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        del fork
        after = process_storage(model) - baseline
        full = cache.full_nbytes()
        row = (f"| `{spec}` | {ratio if ratio is not None else '—'} | {reported / MiB:.1f} MiB | {reachable / MiB:.1f}"
               f" MiB | {after / MiB:.1f} MiB | {full / MiB:.1f} MiB | {cache.peak_bytes / full:.3f} |")  # fmt: skip
        print(row, flush=True)
        del cache
    print(
        f"\nstorage left in the process after dropping every cache: {(process_storage(model) - baseline) / MiB:.2f} MiB"
    )


if __name__ == "__main__":
    main()
