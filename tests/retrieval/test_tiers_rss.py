"""The disk tier really leaves RAM: a retrieval cache whose cold tier is on disk holds about the cold bytes less
resident memory than the same context's full cache (issue 15: RSS ≤ full RSS − 0.8 × cold bytes).

Each cache is built in a fresh process (the same imports, model and 4,096-token context), so what differs between
the two resident set sizes is what the cache keeps resident; the cold tier is ~128 MiB, far above the few MiB the
allocator's own noise can move (its caching of freed memory is fixed: see ``ALLOCATOR``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc/self/statm (Linux)")

# glibc raises its mmap threshold after large frees, so freed tensors of a few MiB would stay in the heap and in the
# RSS although nothing holds them; a fixed threshold returns them, and the RSS then shows what the cache holds.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

SCRIPT = r"""
import gc, json, os, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from kvsqueeze import CompressedCache

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

torch.manual_seed(0)
torch.set_num_threads(1)
config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=512, num_hidden_layers=8,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 256, (1, 4096), generator=torch.Generator().manual_seed(1))
method, ratio, directory = sys.argv[1], sys.argv[2], sys.argv[3]
if "tier=disk" in method:
    method = method + ",dir=" + directory
cache = CompressedCache(model, method, ratio=None if ratio == "none" else float(ratio))
cache.prefill(model, ids)
gc.collect()
print(json.dumps({"rss": rss(), "hot": cache.nbytes(tier="hot"), "cold": cache.nbytes(tier="cold"),
                  "bytes": cache.nbytes()}))
"""


def measure(method: str, ratio: str, directory: Path) -> dict:
    env = {**os.environ, **ALLOCATOR}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, method, ratio, str(directory)], capture_output=True, text=True, timeout=600,
        env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_disk_tier_leaves_resident_memory(tmp_path):
    full = measure("none", "none", tmp_path)
    disk = measure("quest:tier=disk", "0.75", tmp_path)
    ram = measure("quest:tier=ram", "0.75", tmp_path)
    assert disk["cold"] > 100 * 2**20  # the whole context's keys and values (padded pages) are on disk
    assert disk["hot"] <= 0.26 * full["bytes"]  # summaries and the window: the ratio's quarter
    # what the issue asks: the cold bytes are not resident
    assert disk["rss"] <= full["rss"] - 0.8 * disk["cold"], (full, disk)
    # and the RAM tier, holding the same bytes in process memory, stays resident (the measurement can tell them apart)
    assert ram["rss"] >= disk["rss"] + 0.8 * disk["cold"], (ram, disk)
