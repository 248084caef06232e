"""The codec axis: how kept tokens are stored (the blocks themselves live in :mod:`kvsqueeze.core.storage`)."""

from __future__ import annotations

import torch

from kvsqueeze.core.context import LayerContext
from kvsqueeze.core.storage import KVBlock
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.spec import Component

# the smallest value of parameters several codecs share: the full-precision tail (``residual``), its flush size
# (``group``), tokens per quantization group (``size``, 0: the whole head) and per page of a retrieval codec (``page``)
LEAST = {"residual": 0, "group": 1, "size": 0, "page": 1}


class Codec(Component):
    """Encodes kept tokens into a :class:`~kvsqueeze.core.storage.KVBlock`.

    ``residual``: most recent tokens held at full precision in the tail; ``group``: the tail is flushed to
    encoded blocks in multiples of this many tokens.
    """

    axis = "codec"
    residual: int = 0
    group: int = 1

    def check(self) -> None:
        """The shared parameters at their bounds (:data:`LEAST`); subclasses add theirs after ``super().check()``."""
        super().check()
        for key, least in LEAST.items():
            value = getattr(self, key, None)
            if isinstance(value, int) and value < least:
                raise KVSqueezeError(f"{self.name}: {key} must be >= {least}, got {value}")

    def check_head_dim(self, head_dim: int) -> None:
        """Refuse a head dimension this codec cannot encode (one line naming the fix); ``encode`` calls it."""

    def check_setup(self, head_dim: int) -> None:
        """What needs the model or the machine (the head dimension; a retrieval codec's cold directory), checked by
        ``kvsqueeze bench`` from the model's config before any cell runs."""
        self.check_head_dim(head_dim)

    @property
    def is_dense(self) -> bool:
        return False

    @property
    def retrieves(self) -> bool:
        """Retrieval codecs (:mod:`kvsqueeze.retrieval`): a cold copy, the ratio/budget set the hot budget."""
        return False

    def attach(self, host, model) -> None:
        """Called once when a cache is built for ``model`` (codecs that need the model, e.g. its RoPE)."""

    def encode(
        self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, ctx: LayerContext | None = None
    ) -> KVBlock:
        """``keys, values``: flat ``[N, D]`` in (row, head, token) order; ``lengths [B, H]``.

        ``ctx`` is the :class:`~kvsqueeze.core.context.LayerContext` of a compression (queries, positions, layer
        index) and ``None`` when the tail's residual window is flushed during decoding.
        """
        raise NotImplementedError

    def extend(self, block: KVBlock, newer: KVBlock) -> KVBlock | None:
        """Append ``newer`` tokens to ``block`` (one block to attend over); None keeps them separate."""
        return None
