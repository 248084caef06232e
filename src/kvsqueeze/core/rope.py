"""RoPE algebra on cached keys, as transformers computes it (half-split pairs): the model's frequencies, un-rotating
keys to pre-RoPE (KVQuant stores them so), rotating them to other positions (KVQuant's reads, key re-rotation,
KVLink's and APE's re-positioning)."""

from __future__ import annotations

import weakref

import torch

from kvsqueeze.errors import KVSqueezeError


# ---- RoPE ---------------------------------------------------------------------------------------------------
def rope_params(model, who: str = "kvquant", fix: str = "prerope=false") -> tuple[list[float], float]:
    """(inverse frequencies, attention scaling) of the RoPE that the model's full-attention layers use; ``who`` and
    ``fix`` name the caller and the way out in the one-line refusals."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    rot = getattr(base, "rotary_emb", None)
    if rot is None:
        raise KVSqueezeError(f"{type(model).__name__} has no rotary embedding; {who} needs RoPE ({fix})")
    if hasattr(rot, "full_attention_inv_freq"):  # per-layer-type RoPE (Gemma-3): the global layers'
        inv, scale = rot.full_attention_inv_freq, rot.full_attention_attention_scaling
        kind = getattr(rot, "rope_type", {}).get("full_attention", "default")
    else:
        inv, scale, kind = rot.inv_freq, rot.attention_scaling, getattr(rot, "rope_type", "default")
    if kind in ("dynamic", "longrope"):
        raise KVSqueezeError(f"{who} needs static RoPE frequencies, the model uses {kind!r}; {fix}")
    return [float(x) for x in inv.double().cpu()], float(scale)


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_KEYS: dict[int, tuple] = {}  # inv_freq tensor → its table key (read once)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the RoPE angles computed as transformers computes them (float32), returned as float64."""
    ang = positions.float()[:, None] * inv_freq.float().to(positions.device)[None, :]
    return ang.cos().double(), ang.sin().double()


def tensor_key(t: torch.Tensor, memo: dict[int, tuple]) -> bytes:
    """The bytes of a host tensor (a dictionary key), read once per tensor object while it lives."""
    held = memo.get(id(t))
    if held is None or held[0]() is not t:
        held = memo[id(t)] = (weakref.ref(t, lambda _, i=id(t): memo.pop(i, None)), t.double().cpu().numpy().tobytes())
    return held[1]


def cos_sin_table(inv_freq: torch.Tensor, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin of positions ``0 … n-1`` (at least), shared by every layer and block with this RoPE: one
    table per model like transformers' rotary embedding, grown by doubling, not part of any cache's bytes."""
    freq_key = tensor_key(inv_freq, _KEYS)
    key = (freq_key, str(device))
    table = _TABLES.get(key)
    if table is None or table[0].shape[0] < n:
        size = max(1024, 1 << max(n - 1, 1).bit_length())
        ang = torch.arange(size, device=device).float()[:, None] * inv_freq.float().to(device)[None, :]
        table = _TABLES[key] = (ang.cos(), ang.sin())
    return table


def unrope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Pre-RoPE keys of post-RoPE ``x [N, D]`` at ``positions [N]`` (half-split pairs, transformers' layout)."""
    cos, sin = rope_angles(positions, inv_freq)
    h = x.shape[-1] // 2
    a, b = x[:, :h].double(), x[:, h:].double()
    out = torch.cat([a * cos + b * sin, b * cos - a * sin], dim=-1) / scaling
    return out.to(x.dtype if x.dtype.is_floating_point else torch.float32)


def rerope(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    scaling: float = 1.0,
    span: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Inverse of :func:`unrope`: RoPE applied to pre-RoPE ``x [N, D]`` (computed in ``x``'s dtype). ``span``: the
    (smallest, largest) position when the caller knows it (no read of ``positions``)."""
    if span is None and positions.numel():
        span = (int(positions.min()), int(positions.max()))
    if x.dtype == torch.float32 and positions.numel() and span[0] >= 0:
        cos_t, sin_t = cos_sin_table(inv_freq, span[1] + 1, x.device)
        idx = positions.long().to(x.device)
        cos, sin = cos_t.index_select(0, idx), sin_t.index_select(0, idx)
        if scaling != 1.0:
            cos, sin = cos * scaling, sin * scaling
    else:
        cos, sin = rope_angles(positions, inv_freq)
        cos, sin = (cos * scaling).to(x.dtype), (sin * scaling).to(x.dtype)
    h = x.shape[-1] // 2
    a, b = x[:, :h], x[:, h:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def rotate_half_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x [..., D]`` with broadcastable ``cos/sin [..., D/2]`` (half-split pairs), few temporaries."""
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    out = torch.empty_like(x)
    torch.mul(a, cos, out=out[..., :h])
    out[..., :h].addcmul_(b, sin, value=-1)
    torch.mul(b, cos, out=out[..., h:])
    out[..., h:].addcmul_(a, sin)
    return out
