"""``speed``: what compression costs and saves, on the live path (``model.generate``-style prefill then decode).

Per sample (an essay haystack of ``length`` tokens with one number needle) and per method × ratio, measured in
the same run as the full cache: prefill seconds (the forward pass over the prompt, compression included),
compression overhead (``cache.compression_seconds``), decode tokens/second over exactly ``DECODE_TOKENS``
greedy tokens (no early stop), the bytes the cache's tensors hold after decoding and at their peak (storage bytes,
``cache.nbytes()`` / ``cache.peak_bytes``, on every device), and on CUDA ``torch.cuda.max_memory_allocated`` over the
cell (reset per cell; model weights included). The report divides each number by the full cache's on the same
sample (``*_vs_full``). (The process RSS is not reported: its growth is allocator noise at these sizes.)
Default lengths: 1024, 2048 and 4096 tokens.
"""

from __future__ import annotations

from kvsqueeze.bench.tasks.base import Question, Sample, rng_for
from kvsqueeze.bench.text import essay_haystack

DECODE_TOKENS = 32
DEFAULT_LENGTHS = (1024, 2048, 4096)


def generate(tokenizer, *, samples: int, length: int, seed: int, option: str | None = None) -> list[Sample]:
    out = []
    for i in range(samples):
        rng = rng_for("speed", length, seed, i)
        value = str(rng.randrange(1_000_000, 10_000_000))
        hay = essay_haystack(tokenizer, length - 100, rng.randrange(1000))
        cut = hay.find(". ", len(hay) // 2)
        cut = cut + 2 if cut >= 0 else len(hay) // 2
        context = hay[:cut] + f"The special magic number is {value}. " + hay[cut:]
        q = Question("What is the special magic number in the text?", (value,), "The special magic number is",
                     max_new_tokens=DECODE_TOKENS)  # fmt: skip
        out.append(Sample("speed", f"{length}/{i:04d}", "speed", context, (q,), meta={"length": length, "depth": 0.5}))
    return out
