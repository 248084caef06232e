"""``kvtuner``: per-layer (key bits, value bits) chosen by an offline multi-objective search on calibration text.

Paper: "KVTuner: Sensitivity-Aware Layer-wise Mixed Precision KV Cache Quantization for Efficient and Nearly
Lossless LLM Inference", Li et al., arXiv 2502.04420.

Calibration (:mod:`kvsqueeze.calibration.kvtuner`, CLI ``kvsqueeze calibrate kvtuner --model M --out F.json``):

1. Sensitivity: the calibration text is prefilled once with a full cache; for every layer and every candidate
   pair (the paper's KV8, K8V4, KV4, K4V2, KV2) only that layer's cache is quantized (KIVI layout) and the
   next ``probe`` tokens are teacher-forced; the error is the mean KL divergence of the next-token distributions
   from the full cache's.
2. Intra-layer pruning: pairs dominated at a layer (no fewer bits and no lower error than another) are dropped.
3. Inter-layer clustering: layers are grouped into ``clusters`` groups of similar sensitivity (quantiles of
   their KV2 error); a group shares one pair, which shrinks the search space.
4. Multi-objective search over (mean bits, total error): the exact Pareto front of group assignments under
   the additive error model (dynamic programming over groups); the configuration of lowest error within
   ``target`` mean bits is chosen and its real KL re-measured end to end.

The codec ``kvtuner:config=F.json`` quantizes each layer with its pair (keys per-channel over ``group`` tokens,
values per-token; the KIVI layout the paper uses), recent ``residual`` tokens in full precision.

Deviations: the paper searches with NSGA-II on end-task accuracy; here the per-layer error is additive KL on
calibration text, which makes the exact front computable (the chosen point is then measured for real).
Calibration results are cached per model and parameters under ``cache_dir()/calibration``.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvsqueeze.calibration.store import read_file
from kvsqueeze.codecs.base import Codec
from kvsqueeze.codecs.quant import ChannelQ, QuantBlock, TokenQ
from kvsqueeze.core.storage import DenseBlock, KVBlock
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import register


def kivi_block(keys, values, lengths, kbits: int, vbits: int, group: int) -> QuantBlock:
    size = min(group, keys.shape[-1])
    return QuantBlock(ChannelQ.encode(keys, lengths, kbits, group), TokenQ.encode(values, vbits, size), lengths)


def load_config(path: str) -> dict[int, tuple[int, int]]:
    """Per-layer ``(key bits, value bits)`` from a calibration file."""
    if not Path(path).expanduser().is_file():
        raise KVSqueezeError(f"kvtuner config {path!r} not found; run `kvsqueeze calibrate kvtuner --out {path}`")
    return read_file(path, parse_config)


def parse_config(file: Path) -> dict[int, tuple[int, int]]:
    path = str(file)
    try:
        layers = json.loads(file.read_text())["layers"]
        return {int(k): (int(v[0]), int(v[1])) for k, v in layers.items()}
    except (ValueError, KeyError, TypeError, IndexError):
        raise KVSqueezeError(f"{path} is not a kvtuner configuration; rerun `kvsqueeze calibrate kvtuner`") from None


@register
class KVTunerCodec(Codec):
    name = "kvtuner"
    family = "quantization"
    paper = "KVTuner: Sensitivity-Aware Layer-wise Mixed Precision KV Cache Quantization"
    arxiv = "2502.04420"

    config: str = ""
    group: int = 32
    residual: int = 32

    def encode(self, keys, values, lengths, ctx=None) -> KVBlock:
        if ctx is None:  # decode-time flush: quantized by extend() with the layer's bits
            return DenseBlock(keys, values, lengths)
        if not self.config:
            raise KVSqueezeError("kvtuner needs a configuration: kvtuner:config=F.json (kvsqueeze calibrate kvtuner)")
        layers = load_config(self.config)
        if ctx.layer_idx not in layers:
            raise KVSqueezeError(
                f"{self.config} has no bits for layer {ctx.layer_idx}; it was calibrated for another model"
            )
        kb, vb = layers[ctx.layer_idx]
        return kivi_block(keys, values, lengths, kb, vb, self.group)

    def extend(self, block, newer):
        if isinstance(block, QuantBlock) and isinstance(newer, DenseBlock):
            kb, vb = block.keys.bits, block.values.bits
            return block.merge(kivi_block(newer.keys, newer.values, newer.lengths, kb, vb, self.group))
        return None
