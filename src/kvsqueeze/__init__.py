"""kvsqueeze: compress the key/value cache of Hugging Face causal language models."""

from importlib.metadata import PackageNotFoundError, version

from kvsqueeze import codecs, policies, retrieval, schedules, store
from kvsqueeze.conversation import Conversation
from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.models import load_model
from kvsqueeze.pipeline import Pipeline, pipeline
from kvsqueeze.policies.epicache import EpiCache
from kvsqueeze.scope import compress
from kvsqueeze.spec import parse_method, registry

try:  # the version lives in pyproject.toml only
    __version__ = version("kvsqueeze")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

__all__ = [
    "CompressedCache",
    "Conversation",
    "EpiCache",
    "KVSqueezeError",
    "Pipeline",
    "__version__",
    "codecs",
    "compress",
    "load_model",
    "parse_method",
    "pipeline",
    "policies",
    "registry",
    "retrieval",
    "schedules",
    "store",
]
