"""KVQuant's calibration (arXiv 2401.18079): Fisher-weighted non-uniform datatypes per layer for pre-RoPE keys and
for values, fitted on calibration text; see :mod:`kvsqueeze.codecs.kvquant` for the method."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DynamicCache

from kvsqueeze.calibration.store import cached, calibration_dir, calibration_ids, model_key, write_json
from kvsqueeze.codecs.kvquant.codec import CALIBRATED_BITS
from kvsqueeze.codecs.kvquant.nuq import dense_range, outlier_mask
from kvsqueeze.core.compat import with_cache
from kvsqueeze.core.rope import rope_params, unrope
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.models import load_model
from kvsqueeze.progress import NO_PROGRESS, Steps


def weighted_kmeans(x: torch.Tensor, w: torch.Tensor, k: int, iters: int = 40) -> list[float]:
    """Sorted centroids minimizing ``Σ w (x − c(x))²`` in 1-D (Lloyd iterations from weighted quantiles)."""
    x, w = x.double().flatten(), w.double().flatten()
    if float(w.sum()) <= 0:
        w = torch.ones_like(x)
    order = x.argsort()
    xs, ws = x[order], w[order]
    cw = ws.cumsum(0) / ws.sum()
    c = xs[torch.searchsorted(cw, (torch.arange(k, dtype=torch.float64) + 0.5) / k).clamp(max=len(xs) - 1)]
    for _ in range(iters):
        bounds = (c[1:] + c[:-1]) / 2
        a = torch.bucketize(xs, bounds)
        tot = torch.zeros(k, dtype=torch.float64).index_add_(0, a, ws)
        num = torch.zeros(k, dtype=torch.float64).index_add_(0, a, ws * xs)
        new = torch.where(tot > 0, num / tot.clamp(min=1e-300), c)
        new, _ = new.sort()
        if torch.allclose(new, c, atol=1e-9):
            c = new
            break
        c = new
    return [float(v) for v in c]


def normalized_for_kmeans(x: torch.Tensor, g: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense elements of rows ``x [V, n]`` normalized to [-1, 1] and their weights ``g² · half²``."""
    out = outlier_mask(x, fraction)
    mid, half = dense_range(x, out)
    norm = (x.float() - mid[:, None]) / half[:, None]
    weight = g.double() ** 2 * half.double()[:, None] ** 2
    return norm[~out], weight[~out]


def fit_kvquant(
    model, tokenizer=None, *, n_tokens: int = 512, outliers: float = 0.01, progress: Steps = NO_PROGRESS
) -> dict:
    """KVQuant calibration: Fisher-weighted nuq2/3/4 datatypes per layer for pre-RoPE keys and for values."""
    inv_freq, rope_scaling = rope_params(model)
    ids = calibration_ids(model, tokenizer, n_tokens)
    grabbed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    class _Grab(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            key_states.retain_grad()
            value_states.retain_grad()
            grabbed[layer_idx] = (key_states, value_states)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    types = getattr(model.config.get_text_config(), "layer_types", None)
    n_fit = (
        sum(1 for t in types if t == "full_attention") if types else model.config.get_text_config().num_hidden_layers
    )
    progress.start("kvquant: Fisher weights and nuq datatypes", 1 + n_fit)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            out = model(
                inputs_embeds=embeds, labels=ids, **with_cache(model, _Grab(config=model.config)), use_cache=True
            )
            out.loss.backward()
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    progress.advance()
    inv = torch.tensor(inv_freq, dtype=torch.float64)
    layers: dict[str, dict] = {}
    for idx, (k, v) in sorted(grabbed.items()):
        _, H, L, D = k.shape
        pos = torch.arange(L).repeat(H)
        kpre = unrope(k.detach()[0].reshape(H * L, D).double(), pos, inv, rope_scaling)
        gpre = unrope(k.grad[0].reshape(H * L, D).double(), pos, inv, rope_scaling) * rope_scaling**2
        kx = kpre.view(H, L, D).transpose(1, 2).reshape(H * D, L)  # one row per (head, channel)
        kg = gpre.view(H, L, D).transpose(1, 2).reshape(H * D, L)
        vx, vg = v.detach()[0].reshape(H * L, D), v.grad[0].reshape(H * L, D)  # one row per token
        kn, kw = normalized_for_kmeans(kx, kg, outliers)
        vn, vw = normalized_for_kmeans(vx, vg, outliers)
        layers[str(idx)] = {
            str(b): {"keys": weighted_kmeans(kn, kw, 1 << b), "values": weighted_kmeans(vn, vw, 1 << b)}
            for b in CALIBRATED_BITS
        }
        progress.advance()
    return {
        "method": "kvquant",
        "paper": "arXiv 2401.18079",
        "model": model_key(model),
        "calibration": {"tokens": int(ids.shape[1]), "outliers": outliers, "loss": float(out.loss.detach())},
        "rope": {"inv_freq": inv_freq, "scaling": rope_scaling},
        "layers": layers,
    }


def calibrate_kvquant(
    model: str | None,
    out: Path | None = None,
    dtype: str = "float32",
    n_tokens: int = 512,
    progress: Steps = NO_PROGRESS,
) -> Path:
    """Calibrate KVQuant's nuq datatypes for a model (cached per model) and write the configuration JSON to ``out``
    (default: ``kvquant.json`` in the model's calibration folder of the cache directory); return the path."""
    if n_tokens < 16:
        raise KVSqueezeError(f"--tokens must be at least 16 for a kvquant calibration, got {n_tokens}")
    net, tokenizer = load_model(model, dtype)
    config = cached(net, "kvquant", {"dtype": dtype, "n_tokens": n_tokens}, lambda: fit_kvquant(net, tokenizer,
                    n_tokens=n_tokens, progress=progress))  # fmt: skip
    out = Path(out) if out is not None else calibration_dir(net) / "kvquant.json"
    write_json(out, config)
    return out
