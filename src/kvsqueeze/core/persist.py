"""Save and load a :class:`~kvsqueeze.core.cache.CompressedCache`: safetensors for the bytes, a JSON header for
the rest.

What a file holds: every tensor *storage* the cache keeps alive, once, as raw bytes (so views and storages shared
between tensors — MiniCache's shared directions, a fork's blocks — come back shared, and the round trip is bit
for bit), and a header (safetensors metadata ``"kvsqueeze"``) with

- ``format`` (this module's), ``kvsqueeze`` (the package version), ``components`` (each component's ``version``:
  what it stores);
- ``model``: the model's class, its name or path and a hash of its configuration (the attention implementation,
  dtype and name left out), the dtype of the cached tensors;
- ``method`` (the spec), ``ratio``, ``budget``, per-layer ratios, ``tokens_hash`` (SHA-256 of the token ids held,
  when known; the ids themselves are a tensor of the file), the sequence length;
- ``layers`` and ``shared``: each layer's attributes and the cache-wide state, encoded as JSON in which tensors
  are references into the saved storages and kvsqueeze objects (blocks, codec state) are ``{"obj": class,
  "state": …}``. Only classes of kvsqueeze's own modules are rebuilt on load; the model's config and the method's
  codec are not saved but taken from the model and the spec.

Loading checks the format, every component's version, the model and the dtype, and refuses a truncated or corrupt
file, each in one line. Blocks holding a backend's own quantized objects (``hf_quanto``, ``hf_hqq``, ``hf_fp8``)
cannot be saved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import tempfile
from pathlib import Path

import torch
from pydantic import BaseModel
from transformers import PretrainedConfig

from kvsqueeze.core.architectures import check_model
from kvsqueeze.errors import KVSqueezeError, os_reason

FORMAT = 1
KEY = "kvsqueeze"
VOLATILE = {"_attn_implementation_autoset", "_name_or_path", "transformers_version", "dtype", "torch_dtype",
            "_attn_implementation", "_commit_hash"}  # fmt: skip


def config_hash(config) -> str:
    """SHA-256 of a model's configuration without what does not change the model's function."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    data = {k: v for k, v in sorted(text.to_dict().items()) if k not in VOLATILE}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def tokens_hash(tokens: torch.Tensor | None) -> str | None:
    if tokens is None:
        return None
    return hashlib.sha256(tokens.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()


# ---- encoding ------------------------------------------------------------------------------------------------
class Encoder:
    """Objects → JSON-able values; tensors become references into distinct storages (saved once each)."""

    def __init__(self, codec) -> None:
        self.codec = codec
        self.storages: dict[tuple, tuple[str, torch.Tensor]] = {}
        self.on_model: set[str] = set()  # storages that live on the model's device (the rest stay on the CPU)
        self.refs: dict[int, int] = {}  # id of a tensor object → its number (one object referenced twice stays one)
        self.held: list[torch.Tensor] = []  # keeps the numbered objects alive while encoding (ids stay unique)

    def tensor(self, t: torch.Tensor) -> dict:
        if type(t) is not torch.Tensor:
            raise KVSqueezeError(
                f"cannot save a {type(t).__name__} (a backend's own tensor type, e.g. hf_quanto/hf_hqq blocks); "
                "use kivi, int or another kvsqueeze codec to save the cache"
            )
        storage = t.untyped_storage()
        key = (t.device.type, t.device.index, storage.data_ptr(), storage.nbytes())
        if key not in self.storages:
            raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
            self.storages[key] = (f"s{len(self.storages)}", raw.detach().cpu().clone())
            if t.device.type != "cpu":
                self.on_model.add(self.storages[key][0])
        name = self.storages[key][0]
        ref = self.refs.setdefault(id(t), len(self.refs))
        if ref == len(self.held):
            self.held.append(t)
        return {"tensor": name, "ref": ref, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "stride": list(t.stride()), "offset": t.storage_offset()}  # fmt: skip

    def __call__(self, obj):
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj)
        if isinstance(obj, torch.dtype):
            return {"torch_dtype": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return {"device": True}  # the model's device on load
        if isinstance(obj, PretrainedConfig):
            return {"config": True}  # the model's own config on load
        if obj is self.codec:
            return {"codec": True}  # the method's codec on load
        if isinstance(obj, list):
            return [self(x) for x in obj]
        if isinstance(obj, tuple):
            return {"tuple": [self(x) for x in obj]}
        if isinstance(obj, (set, frozenset)):
            return {"set": [self(x) for x in obj]}
        if isinstance(obj, dict):
            return {"items": [[self(k), self(v)] for k, v in obj.items()]}
        cls = type(obj)
        if not cls.__module__.startswith("kvsqueeze."):
            raise KVSqueezeError(
                f"cannot save a {cls.__module__}.{cls.__qualname__} held by the cache (transformers' quantized "
                "backends: hf_quanto, hf_hqq, hf_fp8); use kivi, int, fp8 or another kvsqueeze codec to save it"
            )
        name = f"{cls.__module__}:{cls.__qualname__}"
        if isinstance(obj, BaseModel):
            return {"model": name, "fields": self(dict(obj))}
        if dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
            return {"obj": name, "state": self(dict(vars(obj)))}
        raise KVSqueezeError(f"cannot save a {name} held by the cache")


class Decoder:
    """The inverse of :class:`Encoder`, onto ``device``."""

    def __init__(self, storages: dict[str, torch.Tensor], on_model: set[str], device, config, codec) -> None:
        self.raw = {name: t.to(device) if name in on_model else t for name, t in storages.items()}
        self.device, self.config, self.codec = device, config, codec
        self.objects: dict[int, torch.Tensor] = {}

    def __call__(self, data):
        if data is None or isinstance(data, (bool, int, float, str)):
            return data
        if isinstance(data, list):
            return [self(x) for x in data]
        if not isinstance(data, dict):
            raise ValueError(f"unexpected {type(data).__name__}")
        if "tensor" in data:
            if data.get("ref") in self.objects:
                return self.objects[data["ref"]]
            raw = self.raw[data["tensor"]]
            dtype = getattr(torch, data["dtype"])
            empty = torch.empty(0, dtype=dtype, device=raw.device)
            t = empty.set_(raw.untyped_storage(), data["offset"], data["shape"], data["stride"])
            self.objects[data.get("ref", -1 - len(self.objects))] = t
            return t
        if "torch_dtype" in data:
            return getattr(torch, data["torch_dtype"])
        if "device" in data:
            return self.device
        if "config" in data:
            return self.config
        if "codec" in data:
            return self.codec
        if "tuple" in data:
            return tuple(self(x) for x in data["tuple"])
        if "set" in data:
            return {self(x) for x in data["set"]}
        if "items" in data:
            return {_hashable(self(k)): self(v) for k, v in data["items"]}
        if "model" in data:
            return kvsqueeze_class(data["model"]).model_construct(**self(data["fields"]))
        if "obj" in data:
            cls = kvsqueeze_class(data["obj"])
            obj = cls.__new__(cls)
            obj.__dict__.update(self(data["state"]))
            return obj
        raise ValueError(f"unexpected keys {sorted(data)}")


def _hashable(key):
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def kvsqueeze_class(name: str) -> type:
    """A class of kvsqueeze's own modules, by ``module:qualname`` (nothing else is ever imported from a file)."""
    module, _, qualname = name.partition(":")
    if not module.startswith("kvsqueeze."):
        raise ValueError(f"refusing to rebuild {name}")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise ValueError(f"{name} is not a class")
    return obj


# ---- files -----------------------------------------------------------------------------------------------------
def component_versions(method) -> dict[str, int]:
    return {c.name: type(c).version for c in (method.scorer, method.budget, method.codec, method.schedule)}


def cache_dtype(cache) -> str | None:
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            return str(layer.dtype).removeprefix("torch.")
    return None


def header_of(cache, model_name: str) -> dict:
    return {
        "format": FORMAT,
        "kvsqueeze": package_version(),
        "components": component_versions(cache.method),
        "model": {"class": cache.model_class, "name": model_name, "config": config_hash(cache.config)},
        "dtype": cache_dtype(cache),
        "method": cache.method.spec(),
        "ratio": cache.ratio,
        "budget": cache.budget,
        "layer_ratios": cache.layer_ratios,
        "tokens_hash": tokens_hash(cache.tokens),
        "seq_length": cache.get_seq_length(),
    }


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvsqueeze")
    except PackageNotFoundError:
        return "0+unknown"


def to_bytes(cache) -> bytes:
    """The cache as one safetensors blob (what :func:`save` writes and a store keeps)."""
    from safetensors.torch import save

    encode = Encoder(cache.method.codec)
    state = {
        "layers": [{"class": type(layer).__name__, "state": encode(dict(vars(layer)))} for layer in cache.layers],
        "shared": encode(cache.shared_state),
        "tokens": encode(cache.tokens),
        "peak_bytes": cache.peak_bytes,
        "compression_seconds": cache.compression_seconds,
        "on_model": sorted(encode.on_model),
    }
    header = header_of(cache, str(getattr(cache.config, "_name_or_path", "") or ""))
    tensors = {name: raw for name, raw in encode.storages.values()}
    return save(tensors, metadata={KEY: json.dumps({"header": header, "state": state})})


def save(cache, path: str | os.PathLike) -> Path:
    """Write ``cache`` to ``path`` (one safetensors file, written atomically); returns the path."""
    path = Path(path)
    if path.is_dir():
        raise KVSqueezeError(f"{path} is a directory; give a file path such as {path / 'cache.safetensors'}")
    blob = to_bytes(cache)
    try:
        write_atomically(path, blob)
    except OSError as exc:
        raise KVSqueezeError(
            f"cannot write the cache to {path} ({os_reason(exc, path)}); give a writable path"
        ) from None
    return path


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file in the same folder and a rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def header_bytes(data: bytes) -> dict:
    """The kvsqueeze header of a blob without reading its tensors (the safetensors header: 8 bytes of length, JSON)."""
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 + n or n > 100_000_000:
        raise ValueError("short header")
    return json.loads(json.loads(data[8 : 8 + n])["__metadata__"][KEY])


def from_bytes(data: bytes, where: str) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """``(header, state, storages)`` of a blob, or a one-line error naming ``where`` it came from."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        meta = header_bytes(data)
        return meta["header"], meta["state"], load(data)
    except (SafetensorError, KeyError, ValueError, TypeError, IndexError):
        raise KVSqueezeError(f"{where} is not a kvsqueeze cache file (truncated or corrupt?); save it again") from None


def read(path: str | os.PathLike) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """``(header, state, storages)`` of a saved cache, or a one-line error for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise KVSqueezeError(f"no saved cache at {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KVSqueezeError(f"cannot read {path}: {exc.strerror or exc}") from None
    return from_bytes(data, str(path))


def check_header(header: dict, method, model, path) -> None:
    """Refuse a file of another format, component version, model or dtype."""
    if header.get("format") != FORMAT:
        raise KVSqueezeError(f"{path} has cache format {header.get('format')}, this kvsqueeze reads {FORMAT}")
    mine = component_versions(method)
    if header.get("components") != mine:
        raise KVSqueezeError(
            f"{path} was saved by other versions of {header.get('method')!r}'s components ({header.get('components')}"
            f" vs {mine} here, kvsqueeze {header.get('kvsqueeze')}): recompute the cache"
        )
    saved = header.get("model", {})
    if saved.get("config") != config_hash(model.config) or saved.get("class") != type(model).__name__:
        raise KVSqueezeError(
            f"{path} holds a cache of another model ({saved.get('class')} {saved.get('name')!r}); load it into the "
            "model it was computed with"
        )
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if header.get("dtype") not in (None, dtype):
        raise KVSqueezeError(f"{path} holds {header['dtype']} tensors but the model runs in {dtype}; load it so")


def load(cls, path: str | os.PathLike, model, tokenizer=None):
    """A :class:`CompressedCache` rebuilt from ``path`` for ``model`` (see the module docstring)."""
    return rebuild(cls, *read(path), model, tokenizer, path)


def load_bytes(cls, data: bytes, model, tokenizer=None, where: str = "the blob"):
    """A :class:`CompressedCache` rebuilt from a blob of :func:`to_bytes`."""
    return rebuild(cls, *from_bytes(data, where), model, tokenizer, where)


def rebuild(cls, header: dict, state: dict, storages: dict, model, tokenizer, path):
    from kvsqueeze.spec import parse_method

    check_model(model)
    method = parse_method(header.get("method", ""))
    check_header(header, method, model, path)
    ratio = header.get("layer_ratios") or header.get("ratio")
    cache = cls(model, method, ratio=ratio, budget=header.get("budget"), tokenizer=tokenizer)
    device = next(model.parameters()).device
    decode = Decoder(storages, set(state.get("on_model", ())), device, cache.config, cache.method.codec)
    try:
        if len(state["layers"]) != len(cache.layers):
            raise ValueError("layer count")
        for layer, saved in zip(cache.layers, state["layers"], strict=True):
            if saved["class"] != type(layer).__name__:
                raise ValueError(f"layer class {saved['class']}")
            layer.__dict__.clear()
            layer.__dict__.update(decode(saved["state"]))
        cache.shared_state = decode(state["shared"])
        cache.tokens = decode(state["tokens"])
        cache.peak_bytes = int(state.get("peak_bytes", 0))
        cache.compression_seconds = float(state.get("compression_seconds", 0.0))
    except (KeyError, ValueError, TypeError, AttributeError, ImportError, RuntimeError) as exc:
        raise KVSqueezeError(
            f"{path} does not hold a cache this kvsqueeze can rebuild ({exc}); save it again"
        ) from None
    if cache.get_seq_length() != header.get("seq_length") or tokens_hash(cache.tokens) != header.get("tokens_hash"):
        raise KVSqueezeError(f"{path} is inconsistent (its header does not match its content); save it again")
    return cache
