"""CSKV's offline setting (arXiv 2409.10593): low-rank bases of every layer's cached keys and values fitted on
calibration text; see :mod:`kvsqueeze.codecs.cskv` for the method."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import DynamicCache

from kvsqueeze.calibration.store import calibration_ids, model_key
from kvsqueeze.codecs.cskv import top_basis
from kvsqueeze.core.compat import with_cache
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.models import cache_dir, load_model


def fit_bases(model, ids: torch.Tensor) -> dict:
    """All eigenvectors of ``Xᵀ X`` of every full-attention layer's cached keys/values, per KV head (``[H, D, D]``,
    columns by decreasing eigenvalue), from one forward pass over ``ids``."""
    with torch.no_grad():
        out = model(input_ids=ids, **with_cache(model, DynamicCache(config=model.config)), use_cache=True)
    keys, values, spectra = [], [], []
    for layer in out.past_key_values.layers:
        k, v = layer.keys.float()[0], layer.values.float()[0]  # [H, L, D]
        gk, gv = k.transpose(1, 2) @ k, v.transpose(1, 2) @ v
        keys.append(top_basis(gk, k.shape[-1]).cpu())
        values.append(top_basis(gv, v.shape[-1]).cpu())
        spectra.append(torch.linalg.eigvalsh(gk.double()).flip(-1).float().cpu())
    return {"keys": keys, "values": values, "key_spectra": spectra, "tokens": int(ids.shape[1])}


def fit_cskv(model, tokenizer=None, n_tokens: int = 2048, out: str | Path | None = None) -> Path:
    """Fit CSKV bases on ``n_tokens`` of calibration text (essays; random ids without a tokenizer) and save them.

    Cached: the default path is ``cache_dir()/calibration/<model key>/cskv-<digest>.pt`` keyed on the model's
    configuration and the calibration parameters; an existing file is reused. Use as ``cskv:basis=<path>``.
    """
    params = {"n_tokens": n_tokens, "tokenizer": tokenizer is not None, "version": 1}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(out) if out is not None else cache_dir() / "calibration" / model_key(model) / f"cskv-{digest}.pt"
    if path.is_file():
        return path
    ids = calibration_ids(model, tokenizer, n_tokens)
    if ids.shape[1] < 16:
        raise KVSqueezeError("calibration text too short; install the essays (`kvsqueeze assets install`)")
    data = fit_bases(model, ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(path)
    return path


def calibrate_cskv(
    model: str | None = None, out: Path | None = None, dtype: str = "float32", n_tokens: int = 2048
) -> Path:
    """Fit CSKV low-rank bases for a model on the essays (cached per model); prints the basis file's path."""
    m, tok = load_model(model, dtype)
    return fit_cskv(m, tok, n_tokens, out)
