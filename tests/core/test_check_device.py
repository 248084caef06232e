"""``scripts/check_device.py``: the CPU run passes every check and prints its table; an unavailable device is one
line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_device.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_cpu_fast_run_passes_every_check():
    done = run("--device", "cpu", "--fast")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "all checks passed" in out and "MISMATCH" not in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    names = [row.split(" | ")[0].lstrip("| ") for row in rows]
    assert names[0] == "none" and "| 0.0e+00 | 0 | ok |" in rows[0]  # exactly DynamicCache
    for expected in ("snapkv:window=8+adakv", "kivi:bits=2", "kvquant:bits=3", "snapkv:window=8+kivi", "interval"):
        assert any(expected in name for name in names), (expected, names)
    assert all(" | ok | " in row for row in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_device_is_one_line_exit_2():
    done = run("--device", "cuda", "--fast")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "not available" in done.stderr and "Traceback" not in done.stderr
