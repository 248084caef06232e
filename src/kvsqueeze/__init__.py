"""kvsqueeze: compress the key/value cache of Hugging Face causal language models."""

from kvsqueeze.cache import CompressedCache
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.models import load_model
from kvsqueeze.spec import parse_method, registry

__all__ = ["CompressedCache", "KVSqueezeError", "load_model", "parse_method", "registry"]
__version__ = "0.1.0"
