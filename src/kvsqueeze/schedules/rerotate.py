"""Key re-rotation after eviction (kvpress' ``KeyRerotationPress``; a kvpress component, not a paper).

After a prefill compression keeps ``k`` tokens per head, their keys are re-rotated as if the kept tokens sat at
positions ``0 … k-1`` (in their original order), and the layer's length becomes ``k``: a later token takes position
``k``, so the distance between the question and the context shrinks with the context. This deliberately breaks
kvsqueeze's default invariant (RoPE positions never shift); it is an option of the prefill schedule:
``snapkv+prefill:rerotate=true``.

The rotation is exact RoPE algebra: a post-RoPE key at position ``p`` is un-rotated (float64) and rotated to its new
position with the model's own inverse frequencies and attention scaling (``R(q) R(p)⁻¹``). Supported: full-attention
models with half-split RoPE over the whole head (Llama, Qwen, Mistral …) and the same kept count on every head, row
and layer (uniform budgets); anything else is refused in one line.
"""

from __future__ import annotations

import torch

from kvsqueeze.core.context import LayerContext
from kvsqueeze.core.rope import rerope, rope_params, unrope
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.models import head_dim_of

KEPT = "rerotate_kept"  # shared_state key: the kept count every layer must share


def rope_of(model) -> tuple[torch.Tensor, float]:
    """``(inverse frequencies, attention scaling)`` of ``model``'s RoPE, checked for re-rotation."""
    text = model.config.get_text_config()
    if any(kind != "full_attention" for kind in getattr(text, "layer_types", None) or ()):
        raise KVSqueezeError("prefill:rerotate needs full-attention layers only (this model has sliding windows)")
    inv, scale = rope_params(model, who="prefill:rerotate", fix="drop rerotate=true")
    head_dim = head_dim_of(text)
    if 2 * len(inv) != head_dim:
        raise KVSqueezeError("prefill:rerotate needs RoPE over the whole head (this model rotates part of it)")
    return torch.tensor(inv, dtype=torch.float64), scale


def rerotate_kept(keys: torch.Tensor, keep: torch.Tensor, ctx: LayerContext, rope, shared: dict) -> torch.Tensor:
    """``keys [B, H, L, D]`` with every kept token's key moved from its position to its rank among the kept
    tokens of its (row, head); evicted tokens are left as they were (they are not stored)."""
    counts = keep.sum(-1)
    k = int(counts.flatten()[0]) if counts.numel() else 0
    if not bool((counts == k).all()) or shared.setdefault(KEPT, k) != k:
        raise KVSqueezeError(
            "prefill:rerotate needs the same kept count on every head, row and layer: use a uniform budget "
            "(no adakv/pyramidkv, no padding)"
        )
    B, H, L = keep.shape
    old = ctx.positions if ctx.positions is not None else torch.arange(L, device=keys.device)[None].expand(B, L)
    old = old[:, None, :].expand(B, H, L)
    new = keep.long().cumsum(-1) - 1
    inv, scale = rope
    b, h, t = keep.nonzero(as_tuple=True)
    picked = keys[b, h, t]
    moved = rerope(unrope(picked, old[b, h, t], inv, scale).float(), new[b, h, t], inv, scale).to(keys.dtype)
    out = keys.clone()
    out[b, h, t] = moved
    return out
