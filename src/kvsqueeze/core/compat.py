"""The name under which a model takes its cache: ``cache`` from transformers 5.24, ``past_key_values`` before.

transformers 5.24 renamed the argument of ``forward`` and ``generate`` (the old name still works, with a
``FutureWarning``, until 5.40 for ``forward`` and 6.0 for ``generate``). kvsqueeze asks each model which name its
forward declares, so it passes the cache under the right one on every transformers its range admits, and for
remote-code models that keep the old name.
"""

from __future__ import annotations

import inspect

NEW, OLD = "cache", "past_key_values"


def cache_argument(model) -> str:
    """``"cache"`` or ``"past_key_values"``: what ``model.forward`` (and so ``generate``) calls its cache."""
    parameters = inspect.signature(inspect.unwrap(type(model).forward)).parameters
    return NEW if NEW in parameters else OLD


def with_cache(model, cache) -> dict:
    """Keyword arguments passing ``cache`` to ``model(...)`` or ``model.generate(...)``."""
    return {cache_argument(model): cache}


def passed_cache(kwargs: dict):
    """The cache a forward was called with (under either name), or None."""
    return kwargs.get(NEW, kwargs.get(OLD))
