"""kvsqueeze: compress the key/value cache of Hugging Face causal language models."""

from kvsqueeze import codecs, policies, schedules
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.models import load_model
from kvsqueeze.spec import parse_method, registry

__all__ = [
    "CompressedCache",
    "KVSqueezeError",
    "codecs",
    "load_model",
    "parse_method",
    "policies",
    "registry",
    "schedules",
]
__version__ = "0.1.0"
