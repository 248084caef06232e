"""Codecs: how kept tokens are stored."""

from kvsqueeze.codecs import dense
from kvsqueeze.codecs.base import Codec, DenseBlock, KVBlock, partial_attention

__all__ = ["Codec", "DenseBlock", "KVBlock", "dense", "partial_attention"]
