"""``kvsqueeze.codecs.kvquant``: KVQuant (arXiv 2401.18079) — pre-RoPE keys (through :mod:`kvsqueeze.core.rope`),
``nuq`` (the non-uniform datatype with dense-and-sparse outliers), ``block`` (packed storage and reading it back),
``codec`` (the registered codec and its configuration). Its calibration is :mod:`kvsqueeze.calibration.kvquant`."""

from kvsqueeze.codecs.kvquant.block import KVQuantBlock
from kvsqueeze.codecs.kvquant.codec import CALIBRATED_BITS, KVQuantCodec, formula_bits, load_config
from kvsqueeze.codecs.kvquant.nuq import nuq_encode
from kvsqueeze.core.rope import rerope, rope_params, unrope

__all__ = [
    "CALIBRATED_BITS",
    "KVQuantBlock",
    "KVQuantCodec",
    "formula_bits",
    "load_config",
    "nuq_encode",
    "rerope",
    "rope_params",
    "unrope",
]
