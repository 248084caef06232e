"""``hf_quanto`` / ``hf_hqq`` / ``hf_fp8``: transformers' own quantized-cache backends, as codecs (for comparison).

Not papers: the storage of transformers' ``QuantizedCache`` (``transformers.cache_utils``: ``QuantoQuantizedLayer``,
``HQQQuantizedLayer``, ``Fp8QuantizedLayer``), reused verbatim — each block holds the backend's own quantized
tensors, made by the backend layer's ``_quantize`` and read back by its ``_dequantize``. Running them inside
:class:`~kvsqueeze.core.cache.CompressedCache` gives them the benchmark harness, ``kvsqueeze generate``, ``fork()`` and
byte accounting (the bytes of every tensor the backend holds, its scales and zero-points included, which it keeps at
the model's dtype), and lets them follow an eviction policy (``snapkv+hf_quanto:bits=2``).

Behaviour matched to transformers (``QuantizedCache(backend, config, nbits=…)`` defaults): the whole prefill is
quantized (no full-precision window at prefill); decoded tokens stay at full precision until ``group`` of them
(transformers' ``residual_length``, 128) exist, then everything is dequantized, joined and quantized again, as
transformers does. ``q_group_size`` and ``axis_key``/``axis_value`` are passed through. fp8: one per-tensor scale per
layer, frozen at prefill; later tokens are cast with it and appended (no residual window).

Deviations: heads must keep equal token counts (transformers' layout is a ``[B, H, L, D]`` tensor); the flush happens
when the window is full, before that step's attention (transformers attends first, then quantizes: one step apart).
Needs the optional extra ``kvsqueeze[hf-quant]`` (optimum-quanto 0.2.7, hqq 0.2.8.post1); fp8 needs nothing.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import AfterValidator, Field

from kvsqueeze.codecs.base import Codec
from kvsqueeze.core.storage import DenseBlock, KVBlock
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import register


def _one_of(*allowed: int):
    def check(value: int) -> int:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(map(str, allowed))}, got {value}")
        return value

    return Annotated[int, AfterValidator(check)]


class HFBlock(KVBlock):
    """The backend's quantized keys and values of a ``[B, H, L, D]`` layer (uniform heads)."""

    def __init__(self, layer, qkeys, qvalues, lengths: torch.Tensor, dim: int):
        self.layer, self.qkeys, self.qvalues, self.lengths, self.dim = layer, qkeys, qvalues, lengths.cpu(), dim

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``[B, H, L, D]`` keys and values (transient)."""
        return self.layer._dequantize(self.qkeys), self.layer._dequantize(self.qvalues)

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.dense()
        return k.reshape(-1, self.dim).to(dtype), v.reshape(-1, self.dim).to(dtype)


class _HFCodec(Codec):
    """Shared plumbing: build the transformers layer once per block, quantize 4-D tensors with it."""

    backend: ClassVar[str] = ""
    family = "quantization (transformers)"
    residual: int = 0

    def _layer(self, like: torch.Tensor):
        raise NotImplementedError

    def _quantize(self, layer, keys4: torch.Tensor, values4: torch.Tensor):
        return layer._quantize(keys4.contiguous(), axis=layer.axis_key), layer._quantize(
            values4.contiguous(), axis=layer.axis_value
        )

    @staticmethod
    def _shape(keys: torch.Tensor, lengths: torch.Tensor, who: str) -> tuple[int, int, int, int]:
        if not bool((lengths == lengths.flatten()[0]).all()):
            raise KVSqueezeError(f"{who} stores [batch, heads, tokens, dim] tensors: use a uniform budget (no adakv)")
        B, H = lengths.shape
        return B, H, int(lengths[0, 0]), keys.shape[-1]

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        if ctx is None:  # a full residual window: re-quantized together with the block in extend()
            return DenseBlock(keys, values, lengths)
        B, H, L, D = self._shape(keys, lengths, self.name)
        layer = self._layer(keys)
        qk, qv = self._quantize(layer, keys.reshape(B, H, L, D), values.reshape(B, H, L, D))
        return HFBlock(layer, qk, qv, lengths, D)

    def extend(self, block, newer):
        if not (isinstance(block, HFBlock) and isinstance(newer, DenseBlock)):
            return None
        B, H, L, D = self._shape(newer.keys, newer.lengths, self.name)
        old_k, old_v = block.dense()
        keys = torch.cat([old_k.to(newer.keys.dtype), newer.keys.reshape(B, H, L, D)], dim=-2)
        values = torch.cat([old_v.to(newer.values.dtype), newer.values.reshape(B, H, L, D)], dim=-2)
        qk, qv = self._quantize(block.layer, keys, values)
        return HFBlock(block.layer, qk, qv, block.lengths + newer.lengths, D)


def _unavailable(backend: str, exc: Exception) -> KVSqueezeError:
    return KVSqueezeError(
        f"hf_{backend} needs transformers' {backend} backend: pip install 'kvsqueeze[hf-quant]' ({exc})".splitlines()[0]
    )


@register
class HFQuanto(_HFCodec):
    name = "hf_quanto"
    paper = "transformers QuantizedCache, optimum-quanto backend (baseline)"
    backend = "quanto"

    bits: _one_of(2, 4) = 4
    q_group_size: int = Field(64, ge=1)
    axis_key: _one_of(0, -1) = 0
    axis_value: _one_of(0, -1) = 0
    group: int = Field(128, ge=1)  # transformers' residual_length

    def _layer(self, like):
        from transformers.cache_utils import QuantoQuantizedLayer

        try:
            layer = QuantoQuantizedLayer(self.bits, self.axis_key, self.axis_value, self.q_group_size, self.group)
        except (ImportError, ValueError) as exc:
            raise _unavailable("quanto", exc) from None
        layer.lazy_initialization(like, like)
        return layer


@register
class HFHQQ(_HFCodec):
    name = "hf_hqq"
    paper = "transformers QuantizedCache, HQQ backend (baseline)"
    backend = "hqq"

    bits: _one_of(1, 2, 3, 4, 8) = 4
    q_group_size: int = Field(64, ge=1)
    axis_key: _one_of(0, 1) = 0
    axis_value: _one_of(0, 1) = 0
    group: int = Field(128, ge=1)  # transformers' residual_length

    def _layer(self, like):
        from transformers.cache_utils import HQQQuantizedLayer

        try:
            layer = HQQQuantizedLayer(self.bits, self.axis_key, self.axis_value, self.q_group_size, self.group)
        except (ImportError, ValueError, NameError) as exc:
            raise _unavailable("hqq", exc) from None
        layer.lazy_initialization(like, like)
        return layer


@register
class HFFP8(_HFCodec):
    name = "hf_fp8"
    paper = "transformers QuantizedCache, fp8 backend (per-tensor e4m3 scale, frozen at prefill) (baseline)"
    backend = "fp8"

    group: int = 1

    def _layer(self, like):
        from transformers import cache_utils

        if not hasattr(cache_utils, "Fp8QuantizedLayer"):
            raise KVSqueezeError("hf_fp8 needs a transformers with Fp8QuantizedLayer (5.21 or newer); upgrade it")
        layer = cache_utils.Fp8QuantizedLayer()
        cache_utils.DynamicLayer.lazy_initialization(layer, like, like)  # not Fp8's own: it would quantize ``like``
        return layer

    def _quantize(self, layer, keys4, values4):
        return layer._quantize(keys4), layer._quantize(values4)

    def extend(self, block, newer):
        """Cast the new tokens with the frozen per-tensor scales and append them, as transformers does."""
        if not (isinstance(block, HFBlock) and isinstance(newer, DenseBlock)):
            return None
        B, H, L, D = self._shape(newer.keys, newer.lengths, self.name)
        (qk, sk), (qv, sv) = block.qkeys, block.qvalues
        nk = block.layer._quantize(newer.keys.reshape(B, H, L, D), scale=sk)[0]
        nv = block.layer._quantize(newer.values.reshape(B, H, L, D), scale=sv)[0]
        qkeys, qvalues = (torch.cat([qk, nk], dim=-2), sk), (torch.cat([qv, nv], dim=-2), sv)
        return HFBlock(block.layer, qkeys, qvalues, block.lengths + newer.lengths, D)
