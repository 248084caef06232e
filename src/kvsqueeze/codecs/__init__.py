"""Codecs: how kept tokens are stored."""

from kvsqueeze.codecs import (
    bfp,
    cskv,
    dense,
    fp8,
    gear,
    hf_quant,
    intquant,
    kivi,
    kvquant,
    kvtuner,
    mikv,
    minicache,
    qjl,
    rotatekv,
    think,
    zipcache,
)
from kvsqueeze.codecs.base import Codec
from kvsqueeze.core.attention_math import partial_attention
from kvsqueeze.core.storage import DenseBlock, KVBlock

__all__ = [
    "Codec",
    "DenseBlock",
    "KVBlock",
    "bfp",
    "cskv",
    "dense",
    "fp8",
    "gear",
    "hf_quant",
    "intquant",
    "kivi",
    "kvquant",
    "kvtuner",
    "mikv",
    "minicache",
    "partial_attention",
    "qjl",
    "rotatekv",
    "think",
    "zipcache",
]
