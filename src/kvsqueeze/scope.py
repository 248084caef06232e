"""``with kvsqueeze.compress(model, "snapkv", ratio=0.5): model.generate(...)`` — kvpress' press-style scope.

Inside the block, every forward of ``model`` that would start a new cache (no cache, or an empty
one, as ``generate`` creates) gets a fresh :class:`~kvsqueeze.core.cache.CompressedCache` instead; generate then
carries that cache through its decoding steps. The model itself is left as it was: one forward pre-hook is
registered on entry and removed on exit, also when the block raises. ``scope.cache`` is the last cache created.
"""

from __future__ import annotations

from transformers import Cache

from kvsqueeze.core.cache import CompressedCache
from kvsqueeze.core.compat import passed_cache, with_cache


class compress:
    def __init__(self, model, method: str = "snapkv", *, ratio=None, budget: int | None = None, tokenizer=None):
        self.model, self.method, self.ratio, self.budget = model, method, ratio, budget
        self.tokenizer = tokenizer  # for methods that build prompts (kvzip)
        self.cache: CompressedCache | None = None
        self._new_cache()  # validate the request now, in one line
        self.handle = None

    def _inject(self, module, args, kwargs):
        current = passed_cache(kwargs)
        if isinstance(current, CompressedCache):
            return None
        if current is None or (isinstance(current, Cache) and current.get_seq_length() == 0):
            if kwargs.get("use_cache") is False:
                return None
            self.cache = self._new_cache()
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.cache.tokens = None if ids is None else ids.detach().cpu()  # the hooks it adds start next forward
            kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
            return args, {**kwargs, **with_cache(self.model, self.cache), "use_cache": True}
        return None

    def _new_cache(self) -> CompressedCache:
        return CompressedCache(self.model, self.method, ratio=self.ratio, budget=self.budget, tokenizer=self.tokenizer)

    def __enter__(self) -> compress:
        self.handle = self.model.register_forward_pre_hook(self._inject, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
