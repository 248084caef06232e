"""``kvquant``: pre-RoPE per-channel keys, per-token values, a sensitivity-weighted non-uniform datatype,
per-vector dense-and-sparse outliers and Q-Norm.

Paper: "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache Quantization", Hooper et al.,
arXiv 2401.18079.

- Pre-RoPE keys: the cached (post-RoPE) keys are rotated back exactly with their known positions, quantized
  per channel, and the rotation is re-applied after dequantization when the block is read (the query cannot be
  rotated once instead: the rotation depends on each key's position). Positions are stored (int32; one start
  per head when a head's positions are consecutive, as without eviction).
- Values: per token. (Reading a block gathers cos/sin from one float32 table per RoPE, shared by all layers and grown
  by doubling, as transformers' rotary embedding used to keep; it is model state, not part of a cache's bytes.)
- nuqX: ``2**bits`` centroids per layer (one datatype for keys, one for values) in the normalized range
  ``[-1, 1]``, fitted offline by k-means weighted with the diagonal Fisher information approximated by squared
  gradients of the language-model loss with respect to the keys/values on calibration text
  (:func:`calibrate_kvquant`, CLI ``kvsqueeze calibrate kvquant --out F.json``; cached per model). Elements are
  rounded to the nearest centroid; codes are bit-packed.
- Per-vector dense-and-sparse: in every vector (a key channel over a head's tokens; a value token) the
  ``outliers`` fraction of elements farthest from the vector's mean is stored exactly as fp16 values with int32
  positions (counted in the bytes); the rest is normalized to ``[-1, 1]`` with the vector's own range.
- Q-Norm: per vector, the dequantized dense elements are shifted and scaled so that their mean and standard
  deviation equal those of the originals (folded into the stored fp16 scale and offset: no extra bytes).
- Decoding: each new token's key is quantized with its head's per-channel normalization (the paper's fixed
  per-channel key thresholds: elements outside the range become outliers); its value per token, as the paper does
  online. ``residual=0, group=1`` (the paper keeps no full-precision window).

Deviations: the per-channel key ranges and outlier thresholds are taken from the context being compressed (the
paper calibrates them offline); the calibration text is the offline essays (``n_tokens`` tokens), not Wikitext-2;
the k-means objective weights each normalized element by its Fisher weight times the vector's squared half-range
(the paper's objective ``Σ F (A − Q(A))²`` in activation units); with short vectors the outlier count is
``round(outliers × length)`` (1 per value token at head dim 64 and 1%); no attention-sink token kept in fp16
(a later addition of the paper); no custom kernels — a block is dequantized (transiently) when read. With eviction
and ``residual > 0``, the position of the first token left in the tail is inferred from the stored mask.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from pydantic import Field, field_validator

from kvsqueeze.codecs.base import Codec
from kvsqueeze.codecs.packing import pack, unpack
from kvsqueeze.core.storage import DenseBlock, KVBlock
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.progress import NO_PROGRESS, Steps
from kvsqueeze.spec import register

CALIBRATED_BITS = (2, 3, 4)


# ---- RoPE ---------------------------------------------------------------------------------------------------
def rope_params(model) -> tuple[list[float], float]:
    """(inverse frequencies, attention scaling) of the RoPE that the model's full-attention layers use."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    rot = getattr(base, "rotary_emb", None)
    if rot is None:
        raise KVSqueezeError(f"{type(model).__name__} has no rotary embedding; kvquant needs RoPE (or prerope=false)")
    if hasattr(rot, "full_attention_inv_freq"):  # per-layer-type RoPE (Gemma-3): the global layers'
        inv, scale = rot.full_attention_inv_freq, rot.full_attention_attention_scaling
        kind = getattr(rot, "rope_type", {}).get("full_attention", "default")
    else:
        inv, scale, kind = rot.inv_freq, rot.attention_scaling, getattr(rot, "rope_type", "default")
    if kind in ("dynamic", "longrope"):
        raise KVSqueezeError(f"kvquant needs static RoPE frequencies, the model uses {kind!r}; use prerope=false")
    return [float(x) for x in inv.double().cpu()], float(scale)


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the RoPE angles computed as transformers computes them (float32), returned as float64."""
    ang = positions.float()[:, None] * inv_freq.float().to(positions.device)[None, :]
    return ang.cos().double(), ang.sin().double()


def _cos_sin_table(inv_freq: torch.Tensor, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin of positions ``0 … n-1`` (at least), shared by every layer and block with this RoPE: one
    table per model like transformers' rotary embedding, grown by doubling, not part of any cache's bytes."""
    key = (inv_freq.double().cpu().numpy().tobytes(), str(device))
    table = _TABLES.get(key)
    if table is None or table[0].shape[0] < n:
        size = max(1024, 1 << max(n - 1, 1).bit_length())
        ang = torch.arange(size, device=device).float()[:, None] * inv_freq.float().to(device)[None, :]
        table = _TABLES[key] = (ang.cos(), ang.sin())
    return table


def unrope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Pre-RoPE keys of post-RoPE ``x [N, D]`` at ``positions [N]`` (half-split pairs, transformers' layout)."""
    cos, sin = _angles(positions, inv_freq)
    h = x.shape[-1] // 2
    a, b = x[:, :h].double(), x[:, h:].double()
    out = torch.cat([a * cos + b * sin, b * cos - a * sin], dim=-1) / scaling
    return out.to(x.dtype if x.dtype.is_floating_point else torch.float32)


def rerope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Inverse of :func:`unrope`: RoPE applied to pre-RoPE ``x [N, D]`` (computed in ``x``'s dtype)."""
    if x.dtype == torch.float32 and positions.numel() and int(positions.min()) >= 0:
        cos_t, sin_t = _cos_sin_table(inv_freq, int(positions.max()) + 1, x.device)
        idx = positions.long().to(x.device)
        cos, sin = cos_t.index_select(0, idx), sin_t.index_select(0, idx)
        if scaling != 1.0:
            cos, sin = cos * scaling, sin * scaling
    else:
        cos, sin = _angles(positions, inv_freq)
        cos, sin = (cos * scaling).to(x.dtype), (sin * scaling).to(x.dtype)
    h = x.shape[-1] // 2
    a, b = x[:, :h], x[:, h:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


# ---- the non-uniform datatype with dense-and-sparse outliers -------------------------------------------------
def outlier_mask(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """``x [V, n]`` (one vector per row): True at the ``round(fraction·n)`` elements farthest from the row mean."""
    k = min(round(fraction * x.shape[1]), x.shape[1] - 1) if x.shape[1] else 0
    mask = torch.zeros_like(x, dtype=torch.bool)
    if k > 0:
        dev = (x.float() - x.float().mean(1, keepdim=True)).abs()
        mask.scatter_(1, dev.topk(k, dim=1).indices, True)
    return mask


def dense_range(x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mid, half-range) ``[V]`` of each row's dense (non-outlier) elements; half-range > 0."""
    xf = x.float()
    lo = torch.where(out, torch.full_like(xf, float("inf")), xf).amin(1)
    hi = torch.where(out, torch.full_like(xf, -float("inf")), xf).amax(1)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    return mid, torch.where(half > 0, half, torch.ones_like(half))


_LUTS: dict[tuple, torch.Tensor] = {}


def _lut(centroids: torch.Tensor, bits: int, dtype, device) -> torch.Tensor:
    """Centroid values of every packed byte (2/4 bits: ``[256, 8 // bits]``) or, for 3 bits, of every (2-bit-plane
    byte, 1-bit-plane nibble) pair: ``[4096, 4]`` — four codes per lookup."""
    key = (centroids.cpu().numpy().tobytes(), bits, dtype, str(device))
    if key not in _LUTS:
        c = centroids.to(dtype)
        if bits == 3:
            a = torch.arange(4096) % 256
            nib = torch.arange(4096) // 256
            k = torch.arange(4)
            codes = ((a[:, None] >> (2 * k)) & 3) | (((nib[:, None] >> k) & 1) << 2)
        else:
            per = 8 // bits
            codes = (torch.arange(256)[:, None] >> (torch.arange(per) * bits)) & ((1 << bits) - 1)
        _LUTS[key] = c[codes].to(device).contiguous()
    return _LUTS[key]


def centroid_values(packed: torch.Tensor, bits: int, n: int, centroids: torch.Tensor, dtype) -> torch.Tensor:
    """Centroid values ``[rows, n]`` of packed codes by table lookup (see :func:`kvsqueeze.codecs.packing.pack`:
    a byte holds whole 2/4-bit codes; 3-bit codes are a 2-bit plane then a 1-bit plane, four codes = one byte of
    the first and one nibble of the second)."""
    rows = packed.shape[0]
    if bits in (2, 4):
        vals = _lut(centroids, bits, dtype, packed.device).index_select(0, packed.reshape(-1).to(torch.int32))
        vals = vals.view(rows, -1)
    elif bits == 3:
        n8 = packed.shape[1] // 3 * 8
        plane2, plane1 = packed[:, : n8 // 4], packed[:, n8 // 4 :]
        nib = torch.stack([plane1 & 15, plane1 >> 4], dim=-1).view(rows, n8 // 4)
        idx = plane2.to(torch.int32) + nib.to(torch.int32) * 256
        vals = _lut(centroids, 3, dtype, packed.device).index_select(0, idx.view(-1)).view(rows, n8)
    else:
        return centroids.to(dtype).to(packed.device)[unpack(packed, bits, n).long()]
    return vals if vals.shape[1] == n else vals[:, :n]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x [..., D]`` with broadcastable ``cos/sin [..., D/2]`` (half-split pairs), few temporaries."""
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    out = torch.empty_like(x)
    torch.mul(a, cos, out=out[..., :h])
    out[..., :h].addcmul_(b, sin, value=-1)
    torch.mul(b, cos, out=out[..., h:])
    out[..., h:].addcmul_(a, sin)
    return out


def nearest(norm: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (``centroids`` sorted ascending) of every element: uint8."""
    c = centroids.float().to(norm.device)
    bounds = (c[1:] + c[:-1]) / 2
    return torch.bucketize(norm.float().contiguous(), bounds).to(torch.uint8)


def qnorm_params(x, out, codes, centroids, mid, half, enabled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, offset) ``[V]`` with x̂ = centroid·scale + offset; Q-Norm matches each row's dense mean/std."""
    if not enabled:
        return half.half(), mid.half()
    dense = (~out).float()
    n = dense.sum(1).clamp(min=1)
    q = centroids.float().to(x.device)[codes.long()]
    xf = x.float()
    mu, mu_q = (xf * dense).sum(1) / n, (q * dense).sum(1) / n
    sd = (((xf - mu[:, None]) ** 2 * dense).sum(1) / n).sqrt()
    sd_q = (((q - mu_q[:, None]) ** 2 * dense).sum(1) / n).sqrt()
    scale = torch.where(sd_q > 1e-12, sd / sd_q.clamp(min=1e-12), half)
    return scale.half(), (mu - scale * mu_q).half()


def nuq_encode(x: torch.Tensor, centroids: torch.Tensor, fraction: float, qnorm: bool):
    """Quantize rows ``x [V, n]``: codes ``[V, n]``, outlier mask, (mid, half) and fp16 (scale, offset) ``[V]``."""
    out = outlier_mask(x, fraction)
    mid, half = dense_range(x, out)
    codes = nearest((x.float() - mid[:, None]) / half[:, None], centroids)
    scale, offset = qnorm_params(x, out, codes, centroids, mid, half, qnorm)
    return codes, out, mid, half, scale, offset


# ---- the block ---------------------------------------------------------------------------------------------
class KVQuantBlock(KVBlock):
    """Packed nuq codes of pre-RoPE keys (per channel) and values (per token), outliers, positions.

    Keys: ``kcodes [N, ⌈D/8⌉·bits]``, per (row, head) segment and channel ``kmid/khalf`` (normalization) and
    ``kscale/koff`` (dequantization), fp16 ``[BH, D]``. Values: ``vcodes``, ``vscale/voff [N]`` fp16. Outliers:
    ``k_idx/v_idx`` int32 flat positions in ``[N·D]``, ``k_val/v_val`` fp16. Positions: ``pos_start [BH]`` int32
    (consecutive per head) or ``pos [N]`` int32. ``next_pos [B]``: position of the next token to be appended.
    """

    def __init__(self, **parts):
        self.__dict__.update(parts)
        self.lengths = self.lengths.cpu()

    def positions(self) -> torch.Tensor:
        if self.pos is not None:
            return self.pos.long()
        counts = self.lengths.flatten().to(self.pos_start.device)
        n = int(counts.sum())
        starts = torch.repeat_interleave(self.pos_start.long(), counts, output_size=n)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts, output_size=n)
        return starts + torch.arange(n, device=counts.device) - first

    def _shared_run(self) -> tuple[int, int] | None:
        """(start, length) when every head holds the same consecutive positions (no eviction): broadcastable."""
        if self.pos is not None or not self.uniform:
            return None
        starts = self.pos_start
        if not bool((starts == starts[0]).all()):
            return None
        return int(starts[0]), int(self.lengths[0, 0])

    def dequant_pre(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE keys and values ``[N, D]`` (outliers restored)."""
        D = self.dim
        counts = self.lengths.flatten().to(self.kcodes.device)
        n = int(counts.sum())
        kc = centroid_values(self.kcodes, self.bits, D, self.kcent, dtype)
        if self.uniform and n:
            BH = counts.numel()
            keys = torch.addcmul(self.koff.to(dtype)[:, None], kc.view(BH, -1, D), self.kscale.to(dtype)[:, None]).view(
                n, D
            )
        else:
            ks = torch.repeat_interleave(self.kscale.to(dtype), counts, dim=0, output_size=n)
            ko = torch.repeat_interleave(self.koff.to(dtype), counts, dim=0, output_size=n)
            keys = torch.addcmul(ko, kc, ks)
        vc = centroid_values(self.vcodes, self.bits, D, self.vcent, dtype)
        values = torch.addcmul(self.voff.to(dtype)[:, None], vc, self.vscale.to(dtype)[:, None])
        keys.view(-1).index_copy_(0, self.k_idx.long(), self.k_val.to(dtype))
        values.view(-1).index_copy_(0, self.v_idx.long(), self.v_val.to(dtype))
        return keys, values

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.dequant_pre(torch.float32)
        run = self._shared_run()
        if self.inv_freq is not None and run is not None and keys.numel():
            start, L = run
            cos_t, sin_t = _cos_sin_table(self.inv_freq, start + L, keys.device)
            cos, sin = cos_t[start : start + L], sin_t[start : start + L]
            if self.rope_scaling != 1.0:
                cos, sin = cos * self.rope_scaling, sin * self.rope_scaling
            keys = _rotate(keys.view(-1, L, self.dim), cos, sin).view(-1, self.dim)
        elif self.inv_freq is not None:
            keys = rerope(keys, self.positions(), self.inv_freq, self.rope_scaling)
        return keys.to(dtype), values.to(dtype)

    @property
    def dim(self) -> int:
        return self.kmid.shape[-1]


def _remap(idx: torch.Tensor, dim: int, counts: list[int], shift: list[int]) -> torch.Tensor:
    """Flat positions of a block's elements after segment ``i`` moves by ``shift[i]`` tokens."""
    if not idx.numel():
        return idx
    ends = torch.tensor(counts, device=idx.device).cumsum(0)
    seg = torch.bucketize(idx.long() // dim, ends, right=True)
    return (idx.long() + torch.tensor(shift, device=idx.device)[seg] * dim).to(torch.int32)


def _interleave_rows(a: torch.Tensor, a_counts: list[int], b: torch.Tensor, b_counts: list[int]) -> torch.Tensor:
    parts: list[torch.Tensor] = []
    for x, y in zip(a.split(a_counts), b.split(b_counts), strict=True):
        parts += [x, y]
    return torch.cat(parts)


# ---- calibration --------------------------------------------------------------------------------------------
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


def _normalized(x: torch.Tensor, g: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
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
    from transformers import DynamicCache

    from kvsqueeze.codecs.calibration import calibration_ids, model_key

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
            out = model(inputs_embeds=embeds, labels=ids, past_key_values=_Grab(config=model.config), use_cache=True)
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
        kn, kw = _normalized(kx, kg, outliers)
        vn, vw = _normalized(vx, vg, outliers)
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
    from kvsqueeze.codecs.calibration import cached, calibration_dir, write_json
    from kvsqueeze.models import load_model

    if n_tokens < 16:
        raise KVSqueezeError(f"--tokens must be at least 16 for a kvquant calibration, got {n_tokens}")
    net, tokenizer = load_model(model, dtype)
    config = cached(net, "kvquant", {"dtype": dtype, "n_tokens": n_tokens}, lambda: fit_kvquant(net, tokenizer,
                    n_tokens=n_tokens, progress=progress))  # fmt: skip
    out = Path(out) if out is not None else calibration_dir(net) / "kvquant.json"
    write_json(out, config)
    return out


@lru_cache(maxsize=16)
def load_config(path: str) -> dict:
    """A calibration file: ``{"rope": (inv_freq tensor, scaling), "layers": {layer: {bits: (keys, values)}}}``."""
    file = Path(path)
    if not file.is_file():
        raise KVSqueezeError(f"kvquant config {path!r} not found; run `kvsqueeze calibrate kvquant --out {path}`")
    try:
        data = json.loads(file.read_text())
        rope = (torch.tensor(data["rope"]["inv_freq"], dtype=torch.float64), float(data["rope"]["scaling"]))
        layers = {
            int(k): {int(b): (torch.tensor(c["keys"]), torch.tensor(c["values"])) for b, c in v.items()}
            for k, v in data["layers"].items()
        }
    except (ValueError, KeyError, TypeError):
        raise KVSqueezeError(f"{path} is not a kvquant configuration; rerun `kvsqueeze calibrate kvquant`") from None
    return {"rope": rope, "layers": layers}


# ---- the codec ----------------------------------------------------------------------------------------------
@register
class KVQuantCodec(Codec):
    name = "kvquant"
    family = "quantization"
    paper = "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache Quantization"
    arxiv = "2401.18079"

    bits: int = 3
    config: str = ""
    outliers: float = Field(0.01, ge=0.0, lt=0.5)
    qnorm: bool = True
    prerope: bool = True
    residual: int = 0
    group: int = 1

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value not in CALIBRATED_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, CALIBRATED_BITS))}, got {value}")
        return value

    def _datatype(self, layer_idx: int):
        if not self.config:
            raise KVSqueezeError("kvquant needs a calibration: kvquant:config=F.json (kvsqueeze calibrate kvquant)")
        cfg = load_config(self.config)
        if layer_idx not in cfg["layers"]:
            raise KVSqueezeError(f"{self.config} has no datatype for layer {layer_idx}; calibrate for this model")
        kc, vc = cfg["layers"][layer_idx][self.bits]
        inv, scaling = cfg["rope"]
        return kc.half(), vc.half(), (inv if self.prerope else None), scaling

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        if ctx is None:  # decode-time flush: quantized by extend() with the head's per-channel normalization
            return DenseBlock(keys, values, lengths)
        kcent, vcent, inv_freq, scaling = self._datatype(ctx.layer_idx)
        B, H = lengths.shape
        L = ctx.length
        dev = keys.device
        pos_all = ctx.positions if ctx.positions is not None else torch.arange(L, device=dev)[None].expand(B, L)
        stored = ctx.stored if ctx.stored is not None else torch.ones(B, H, L, dtype=torch.bool, device=dev)
        pos = pos_all[:, None, :].expand(B, H, L)[stored]
        r = min(self.residual, L)
        in_tail = r > 0 and not bool(stored[..., L - r :].any())
        next_pos = pos_all[:, L - r] if in_tail else pos_all[:, -1] + 1
        return self._build(keys, values, lengths, pos, next_pos, kcent, vcent, inv_freq, scaling)

    def _build(self, keys, values, lengths, pos, next_pos, kcent, vcent, inv_freq, scaling) -> KVQuantBlock:
        counts = lengths.flatten().tolist()
        D = keys.shape[-1]
        pre = unrope(keys.float(), pos, inv_freq, scaling) if inv_freq is not None else keys.float()
        kcodes, kmids, khalfs, kscales, koffs, kidx, kval = [], [], [], [], [], [], []
        start = 0
        for seg in pre.split(counts):
            n = seg.shape[0]
            if n == 0:
                for lst in (kmids, khalfs, kscales, koffs):
                    lst.append(torch.zeros(D, device=keys.device, dtype=torch.float16))
                continue
            codes, out, mid, half, scale, off = nuq_encode(seg.T, kcent, self.outliers, self.qnorm)
            kcodes.append(codes.T)
            kmids.append(mid.half())
            khalfs.append(half.half())
            kscales.append(scale)
            koffs.append(off)
            t, c = out.T.nonzero(as_tuple=True)
            kidx.append(((start + t) * D + c).to(torch.int32))
            kval.append(seg[t, c].half())
            start += n
        vcodes, vout, _, _, vscale, voff = nuq_encode(values.float(), vcent, self.outliers, self.qnorm)
        vt, vch = vout.nonzero(as_tuple=True)
        contiguous = all(bool((s[1:] - s[:-1] == 1).all()) for s in pos.split(counts) if s.numel() > 1)
        starts = torch.stack([s[0] if s.numel() else s.new_zeros(()) for s in pos.split(counts)])
        empty_i, empty_h = torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.float16)
        return KVQuantBlock(
            lengths=lengths, bits=self.bits, inv_freq=inv_freq, rope_scaling=scaling,
            kcodes=pack(torch.cat(kcodes) if kcodes else torch.zeros(0, D, dtype=torch.uint8), self.bits),
            kmid=torch.stack(kmids), khalf=torch.stack(khalfs), kscale=torch.stack(kscales), koff=torch.stack(koffs),
            k_idx=torch.cat(kidx) if kidx else empty_i, k_val=torch.cat(kval) if kval else empty_h,
            vcodes=pack(vcodes, self.bits), vscale=vscale, voff=voff,
            v_idx=(vt * D + vch).to(torch.int32), v_val=values[vt, vch].half(),
            pos_start=starts.to(torch.int32) if contiguous else None,
            pos=None if contiguous else pos.to(torch.int32),
            next_pos=next_pos.to(torch.int32), kcent=kcent, vcent=vcent,
        )  # fmt: skip

    def extend(self, block, newer):
        if isinstance(block, KVQuantBlock) and isinstance(newer, DenseBlock):
            return self.append(block, newer.keys, newer.values, newer.lengths)
        return None

    def append(self, block: KVQuantBlock, keys, values, lengths) -> KVQuantBlock:
        """Quantize newly decoded tokens (flat ``[N, D]``, ``lengths [B, H]``) into ``block``."""
        B, H = lengths.shape
        D = block.dim
        new_counts, old_counts = lengths.flatten().tolist(), block.lengths.flatten().tolist()
        dev = keys.device
        pos = torch.cat(
            [block.next_pos.long()[b] + torch.arange(n, device=dev) for b in range(B) for n in new_counts[b * H :][:H]]
        )
        rep = torch.tensor(new_counts, device=dev)
        pre = unrope(keys.float(), pos, block.inv_freq, block.rope_scaling) if block.inv_freq is not None else keys
        mid = torch.repeat_interleave(block.kmid.float(), rep, dim=0, output_size=len(pos))
        half = torch.repeat_interleave(block.khalf.float(), rep, dim=0, output_size=len(pos))
        norm = (pre.float() - mid) / half
        kout = norm.abs() > 1.0  # beyond the head's per-channel thresholds: stored exactly
        kcodes = nearest(norm, block.kcent)
        vcodes, vout, _, _, vscale, voff = nuq_encode(values.float(), block.vcent, self.outliers, self.qnorm)
        old_shift = [sum(new_counts[:i]) for i in range(len(old_counts))]
        new_shift = [sum(old_counts[: i + 1]) for i in range(len(new_counts))]
        nk_t, nk_c = kout.nonzero(as_tuple=True)
        nv_t, nv_c = vout.nonzero(as_tuple=True)
        new_kidx = _remap((nk_t * D + nk_c).to(torch.int32), D, new_counts, new_shift)
        new_vidx = _remap((nv_t * D + nv_c).to(torch.int32), D, new_counts, new_shift)
        k_idx = torch.cat([_remap(block.k_idx, D, old_counts, old_shift), new_kidx])
        v_idx = torch.cat([_remap(block.v_idx, D, old_counts, old_shift), new_vidx])
        k_val = torch.cat([block.k_val, pre[nk_t, nk_c].half()])
        v_val = torch.cat([block.v_val, values[nv_t, nv_c].half()])
        next_start = [a + b for a, b in zip(block.pos_start.tolist(), old_counts, strict=True)] if block.pos is None \
            else None  # fmt: skip
        contiguous = next_start is not None and all(
            n == 0 or int(s[0]) == e for s, n, e in zip(pos.split(new_counts), new_counts, next_start, strict=True)
        )
        return KVQuantBlock(
            lengths=block.lengths + lengths, bits=block.bits, inv_freq=block.inv_freq, rope_scaling=block.rope_scaling,
            kcodes=_interleave_rows(block.kcodes, old_counts, pack(kcodes, block.bits), new_counts),
            kmid=block.kmid, khalf=block.khalf, kscale=block.kscale, koff=block.koff,
            k_idx=k_idx, k_val=k_val,
            vcodes=_interleave_rows(block.vcodes, old_counts, pack(vcodes, block.bits), new_counts),
            vscale=_interleave_rows(block.vscale, old_counts, vscale, new_counts),
            voff=_interleave_rows(block.voff, old_counts, voff, new_counts),
            v_idx=v_idx, v_val=v_val,
            pos_start=block.pos_start if contiguous else None,
            pos=None if contiguous else _interleave_rows(block.positions().to(torch.int32), old_counts,
                                                         pos.to(torch.int32), new_counts),
            next_pos=block.next_pos + torch.tensor(new_counts, device=dev).view(B, H)[:, 0].to(torch.int32),
            kcent=block.kcent, vcent=block.vcent,
        )  # fmt: skip


def formula_bits(bits: int, dim: int, tokens_per_head: int, fraction: float) -> float:
    """Expected bits per element of a KVQuant block without eviction (one segment per head, consecutive
    positions): codes, per-channel key parameters, per-token value scale/offset, outliers (fp16 + int32)."""
    keys = bits + 4 * 16 / tokens_per_head + round(fraction * tokens_per_head) * 48 / tokens_per_head
    values = bits + 2 * 16 / dim + round(fraction * dim) * 48 / dim
    return (keys + values) / 2 + 32 / (2 * tokens_per_head * dim)


__all__ = ["KVQuantBlock", "KVQuantCodec", "calibrate_kvquant", "fit_kvquant", "formula_bits", "rerope", "unrope"]
