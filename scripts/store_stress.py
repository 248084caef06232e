"""Stress and throughput of the cache stores: ``P`` processes × ``N`` random put/get of caches of ``1–50`` MB on
shared keys, every read checked bit for bit; prints lost/corrupt counts and MB/s per backend.

    python scripts/store_stress.py --backend directory --backend redis [--procs 2 --ops 200 --min-mb 1 --max-mb 50]

Caches are real :class:`~kvsqueeze.CompressedCache` objects of a small random Llama (method ``none``) whose
tensors are drawn from a seed recorded in their token ids, so a reader regenerates what it must find. Every key is
written once before the workers start; afterwards a read that finds nothing is *lost*, a read that does not load
or differs from its seed's tensors is *corrupt*. ``redis`` starts its own ``redis-server`` on a free port.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvsqueeze import CompressedCache
from kvsqueeze.core.persist import load_bytes, to_bytes
from kvsqueeze.store import open as open_store

CONFIG = dict(vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=1 << 20)  # fmt: skip
KEYS = 16


def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def tensors(seed: int, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (1, CONFIG["num_key_value_heads"], tokens, CONFIG["hidden_size"] // CONFIG["num_attention_heads"])
    return [
        (torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(CONFIG["num_hidden_layers"])
    ]


def make_cache(m, seed: int, megabytes: float) -> CompressedCache:
    per_token = CONFIG["num_hidden_layers"] * 2 * CONFIG["hidden_size"] * 4
    tokens = max(1, int(megabytes * 2**20 / per_token))
    cache = CompressedCache(m, "none")
    for layer, (k, v) in zip(cache.layers, tensors(seed, tokens), strict=True):
        layer.update(k, v)
    cache.tokens = torch.full((1, tokens), seed, dtype=torch.long)
    return cache


def check(m, blob: bytes) -> bool:
    try:
        cache = load_bytes(CompressedCache, blob, m)
    except Exception:
        return False
    seed, tokens = int(cache.tokens[0, 0]), cache.tokens.shape[-1]
    expected = tensors(seed, tokens)
    return all(torch.equal(layer.keys, k) and torch.equal(layer.values, v)
               for layer, (k, v) in zip(cache.layers, expected, strict=True))  # fmt: skip


def worker(url: str, wid: int, ops: int, sizes: tuple[float, float], out) -> None:
    torch.set_num_threads(1)
    m, store, rng = model(), open_store(url), random.Random(wid)
    stats = {"put_bytes": 0, "put_s": 0.0, "get_bytes": 0, "get_s": 0.0, "lost": 0, "corrupt": 0, "puts": 0, "gets": 0}
    for _ in range(ops):
        key = f"stress-{rng.randrange(KEYS)}"
        if rng.random() < 0.5:
            blob = to_bytes(make_cache(m, rng.randrange(1, 2**31), rng.uniform(*sizes)))
            start = time.perf_counter()
            store.backend.put(key, blob)
            stats["put_s"] += time.perf_counter() - start
            stats["put_bytes"] += len(blob)
            stats["puts"] += 1
        else:
            start = time.perf_counter()
            blob = store.backend.get(key)
            stats["get_s"] += time.perf_counter() - start
            stats["gets"] += 1
            if blob is None:
                stats["lost"] += 1
                continue
            stats["get_bytes"] += len(blob)
            stats["corrupt"] += not check(m, blob)
    out.put(stats)


def redis_server() -> tuple[str, subprocess.Popen, Path]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = Path(tempfile.mkdtemp())
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL)  # fmt: skip
    import redis

    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0", proc, workdir


def run(backend: str, procs: int, ops: int, sizes: tuple[float, float]) -> dict:
    server = None
    if backend == "redis":
        url, server, workdir = redis_server()
    else:
        workdir = Path(tempfile.mkdtemp())
        url = str(workdir / "store")
    try:
        m, store = model(), open_store(url)
        for i in range(KEYS):  # every key exists before the workers start: a read that finds nothing lost it
            store.backend.put(f"stress-{i}", to_bytes(make_cache(m, 1000 + i, sizes[0])))
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        start = time.perf_counter()
        workers = [ctx.Process(target=worker, args=(url, w, ops, sizes, queue)) for w in range(procs)]
        for p in workers:
            p.start()
        results = [queue.get() for _ in workers]
        for p in workers:
            p.join()
        wall = time.perf_counter() - start
        total = {k: sum(r[k] for r in results) for k in results[0]}
        final_corrupt = sum(not check(m, store.backend.get(k) or b"") for k in store.backend.entries())
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    mb = 2**20
    put_rate = total["put_bytes"] / mb / max(total["put_s"], 1e-9)
    get_rate = total["get_bytes"] / mb / max(total["get_s"], 1e-9)
    return {"backend": backend, "ops": total["puts"] + total["gets"], "lost": total["lost"],
            "corrupt": total["corrupt"] + final_corrupt, "put MB/s": put_rate, "get MB/s": get_rate,
            "wall s": wall}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", choices=("directory", "redis"))
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--ops", type=int, default=200)
    parser.add_argument("--min-mb", type=float, default=1.0)
    parser.add_argument("--max-mb", type=float, default=50.0)
    args = parser.parse_args()
    rows = [run(b, args.procs, args.ops, (args.min_mb, args.max_mb)) for b in args.backend or ["directory", "redis"]]
    print(f"{args.procs} processes x {args.ops} random put/get of {args.min_mb:g}-{args.max_mb:g} MB caches, "
          f"{KEYS} shared keys (MB/s: bytes moved / seconds inside put or get, both summed over processes: the rate "
          "one process sees)\n")  # fmt: skip
    print("| backend | operations | lost | corrupt | put MB/s | get MB/s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['ops']} | {r['lost']} | {r['corrupt']} | {r['put MB/s']:.0f} | "
              f"{r['get MB/s']:.0f} | {r['wall s']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
