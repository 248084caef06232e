"""KVTuner's offline search (arXiv 2502.04420): per-layer sensitivity of each (key bits, value bits) pair on
calibration text, intra-layer pruning, inter-layer clustering and the exact Pareto front; see
:mod:`kvsqueeze.codecs.kvtuner` for the method and its deviations."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from kvsqueeze.calibration.store import cached, calibration_dir, calibration_ids, model_key, write_json
from kvsqueeze.codecs.kvtuner import kivi_block
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.compat import with_cache
from kvsqueeze.core.layer import CompressedLayer
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.models import load_model
from kvsqueeze.progress import NO_PROGRESS, Steps

CANDIDATES: tuple[tuple[int, int], ...] = ((8, 8), (8, 4), (4, 4), (4, 2), (2, 2))


def _quantize_layer(cache, layer_idx: int, kbits: int, vbits: int, group: int) -> None:
    """Replace one (uncompressed) layer's full-precision storage by a KIVI block at ``(kbits, vbits)``."""
    layer = cache.layers[layer_idx]
    B, H, L, D = layer.keys.shape
    lengths = torch.full((B, H), L)
    layer.blocks = [kivi_block(layer.keys.reshape(-1, D), layer.values.reshape(-1, D), lengths, kbits, vbits, group)]
    layer.keys, layer.values = layer.keys.new_empty(B, H, 0, D), layer.values.new_empty(B, H, 0, D)
    layer.compressions += 1


def _probe_kl(model, cache, probe_ids, ref_logp) -> float:
    with torch.no_grad():
        logits = model(probe_ids, **with_cache(model, cache.fork()), use_cache=True).logits
    logp = torch.log_softmax(logits.float(), -1)
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())


def pareto_front(errors: list[list[float]], bits: list[float], clusters: list[list[int]]) -> list[dict]:
    """The exact Pareto front of (mean bits, total error) over one pair per cluster.

    Dynamic programming over clusters on the total bit count (pair bits are multiples of 1/2): for every
    reachable total the lowest-error assignment is kept, then dominated totals are dropped.
    """
    n_layers = sum(len(c) for c in clusters)
    states: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}  # total half-bits -> (error, pair per cluster)
    for members in clusters:
        nxt: dict[int, tuple[float, list[int]]] = {}
        for total, (err, choice) in states.items():
            for p, b in enumerate(bits):
                e = sum(errors[layer][p] for layer in members)
                if e == float("inf"):
                    continue
                key = total + round(2 * b) * len(members)
                if key not in nxt or err + e < nxt[key][0]:
                    nxt[key] = (err + e, [*choice, p])
        states = nxt
    front, best = [], float("inf")
    for total in sorted(states):
        err, choice = states[total]
        if err < best - 1e-15:
            best = err
            layers = [0] * n_layers
            for members, p in zip(clusters, choice, strict=True):
                for layer in members:
                    layers[layer] = p
            front.append({"pairs": layers, "mean_bits": total / 2 / n_layers, "error": err})
    return front


def search(
    model,
    tokenizer=None,
    *,
    n_tokens: int = 256,
    probe: int = 16,
    target: float = 3.0,
    clusters: int = 4,
    group: int = 32,
    candidates: tuple[tuple[int, int], ...] = CANDIDATES,
    progress: Steps = NO_PROGRESS,
) -> dict:
    """Run KVTuner's calibration on ``model`` and return the configuration (JSON-serializable)."""
    ids = calibration_ids(model, tokenizer, n_tokens + probe)
    if ids.shape[1] < 2 * probe:
        raise KVSqueezeError("calibration text too short; install the essays (`kvsqueeze assets install`)")
    ctx_ids, probe_ids = ids[:, :-probe], ids[:, -probe:]
    base = CompressedCache(model, "none")
    with torch.no_grad():
        model(ctx_ids, **with_cache(model, base), use_cache=True)
        ref_logp = torch.log_softmax(model(probe_ids, **with_cache(model, base.fork())).logits.float(), -1)
    layer_ids = [i for i, layer in enumerate(base.layers) if isinstance(layer, CompressedLayer)]
    progress.start("kvtuner: layer sensitivity", len(layer_ids) * len(candidates) + 1)
    errors: list[list[float]] = []
    for idx in layer_ids:
        row = []
        for kb, vb in candidates:
            trial = base.fork()
            _quantize_layer(trial, idx, kb, vb, group)
            row.append(max(_probe_kl(model, trial, probe_ids, ref_logp), 0.0))
            progress.advance()
        errors.append(row)
    pair_bits = [(kb + vb) / 2 for kb, vb in candidates]
    pruned = []  # intra-layer pruning: candidates a layer may use
    for row in errors:
        pruned.append(
            [
                p
                for p in range(len(candidates))
                if not any(pair_bits[o] <= pair_bits[p] and row[o] < row[p] for o in range(len(candidates)) if o != p)
            ]
        )
    order = sorted(range(len(layer_ids)), key=lambda i: errors[i][-1])  # by sensitivity at the lowest bits
    k = max(1, min(clusters, len(order)))
    groups = [g for g in (order[i * len(order) // k : (i + 1) * len(order) // k] for i in range(k)) if g]
    masked = [list(row) for row in errors]  # a group may use the pairs that survive pruning at any member
    for members in groups:
        allowed = set().union(*(pruned[i] for i in members))
        for i in members:
            masked[i] = [e if p in allowed else float("inf") for p, e in enumerate(errors[i])]
    front = pareto_front(masked, pair_bits, groups)
    feasible = [p for p in front if p["mean_bits"] <= target + 1e-9] or front[:1]
    chosen = min(feasible, key=lambda p: p["error"])
    pairs = {str(layer_ids[i]): list(candidates[p]) for i, p in enumerate(chosen["pairs"])}
    trial = base.fork()
    for layer, (kb, vb) in pairs.items():
        _quantize_layer(trial, int(layer), kb, vb, group)
    measured = _probe_kl(model, trial, probe_ids, ref_logp)
    progress.advance()
    return {
        "method": "kvtuner",
        "paper": "arXiv 2502.04420",
        "model": model_key(model),
        "calibration": {"tokens": int(ctx_ids.shape[1]), "probe": probe, "group": group, "target_bits": target},
        "candidates": [list(c) for c in candidates],
        "sensitivity": {str(layer_ids[i]): row for i, row in enumerate(errors)},
        "clusters": [[layer_ids[i] for i in g] for g in groups],
        "pareto": [
            {"mean_bits": p["mean_bits"], "error": p["error"], "pairs": [list(candidates[q]) for q in p["pairs"]]}
            for p in front
        ],
        "layers": pairs,
        "mean_bits": chosen["mean_bits"],
        "predicted_kl": chosen["error"],
        "measured_kl": measured,
    }


def calibrate_kvtuner(
    model: str | None, out: Path | None = None, dtype: str = "float32", progress: Steps = NO_PROGRESS, **params
) -> Path:
    """Calibrate KVTuner for ``model`` (None = embedded SmolLM2), cache the result per model and write it to ``out``
    (default: ``kvtuner.json`` in the model's calibration folder of the cache directory); return the path."""

    net, tokenizer = load_model(model, dtype)
    effective = {
        name: p.default
        for name, p in inspect.signature(search).parameters.items()
        if p.kind is p.KEYWORD_ONLY and name != "progress"
    }
    unknown = sorted(set(params) - set(effective))
    if unknown:
        raise KVSqueezeError(
            f"unknown kvtuner calibration parameter(s) {', '.join(unknown)}; valid: {', '.join(effective)}"
        )
    effective.update(params)
    key = {"dtype": dtype, **{k: [list(c) for c in v] if k == "candidates" else v for k, v in effective.items()}}
    config = cached(net, "kvtuner", key, lambda: search(net, tokenizer, progress=progress, **params))
    out = Path(out) if out is not None else calibration_dir(net) / "kvtuner.json"
    write_json(out, config)
    return out
