"""MiniCache's premise on SmolLM2: mean per-head cosine similarity of adjacent layers' cached keys and values
(not collected by pytest).

    OMP_NUM_THREADS=1 .venv/bin/python tests/reshape/measure_minicache_similarity.py \
        > docs/results/reshape/minicache_similarity.txt
"""

from __future__ import annotations

import torch

from kvsqueeze import CompressedCache, load_model
from kvsqueeze.bench.text import essay_stream


def main(tokens: int = 512) -> None:
    model, tok = load_model()
    ids, starts = essay_stream(tok)
    x = torch.tensor([ids[starts[0] : starts[0] + tokens]])
    cache = CompressedCache(model, "none")
    cache.prefill(model, x)
    print(f"SmolLM2, first {tokens} tokens of essay 0: mean cosine(x_l-1, x_l) per (KV head, token)")
    print("layers   keys    values")
    for layer in range(1, len(cache.layers)):
        a, b = cache.layers[layer - 1], cache.layers[layer]
        k = torch.nn.functional.cosine_similarity(a.keys.float(), b.keys.float(), dim=-1).mean()
        v = torch.nn.functional.cosine_similarity(a.values.float(), b.values.float(), dim=-1).mean()
        print(f"{layer - 1:2d}-{layer:2d}  {k:+.3f}  {v:+.3f}")


if __name__ == "__main__":
    main()
