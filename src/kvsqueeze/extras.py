"""Optional dependencies: which extra provides what, and a one-line error naming it when it is missing."""

from __future__ import annotations

import importlib.util

from kvsqueeze.errors import KVSqueezeError

# import name -> extra that installs it
PROVIDED_BY = {
    "typer": "cli",
    "rich": "cli",
    "matplotlib": "bench",
    "scipy": "bench",
    "datasets": "bench",
    "rouge": "bench",
    "rouge_score": "bench",
    "rapidfuzz": "bench",
    "jieba": "bench",
    "ray": "ray",
    "redis": "redis",
    "gguf": "embedded",
    "accelerate": "embedded",
}


def missing(*modules: str) -> list[str]:
    """The modules of ``modules`` that cannot be imported (found without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(what: str, *modules: str) -> None:
    """Raise a one-line ``KVSqueezeError`` naming the extra(s) to install when any of ``modules`` is missing."""
    absent = missing(*modules)
    if absent:
        extras = ",".join(dict.fromkeys(PROVIDED_BY.get(m, m) for m in absent))
        raise KVSqueezeError(f"{what} needs {', '.join(absent)}: pip install 'kvsqueeze[{extras}]'")
