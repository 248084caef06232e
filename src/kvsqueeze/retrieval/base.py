"""What retrieval codecs share: the cold tier's parameters and the hot budget.

A retrieval codec is a codec (the ``codec`` axis of a method spec) whose block keeps small summaries hot and the
full keys/values (or what it needs of them) in a :class:`~kvsqueeze.core.tiers.ColdStore`; its ``attend`` picks
what the query needs and fetches only that. ``ratio``/``budget`` set what stays hot (summaries, the recent
window and the pages fetched per step, all counted in tokens of the full cache: a token is its key and value at
the model's dtype): ``ratio=0.75`` keeps at most a quarter of the full cache's bytes hot. With an evicting scorer
(``snapkv+quest``) the ratio is the scorer's; what is fetched per step is then ``fetch`` tokens per head (default:
every kept token, so the kept tokens are only moved to the cold tier).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.codecs.base import Codec
from kvsqueeze.core.context import LayerContext
from kvsqueeze.core.tiers import BACKENDS, ColdStore, check_directory
from kvsqueeze.errors import KVSqueezeError

NEVER = 1 << 30  # group: tokens decoded after the prefill stay in the hot window


class RetrievalCodec(Codec):
    """Base of the retrieval codecs: ``residual`` (the recent window kept hot), ``tier`` (``ram`` or ``disk``),
    ``dir`` (the disk tier's directory; empty: the system's temporary directory), ``fetch`` (tokens fetched per
    step and head; 0: derived from the ratio/budget)."""

    family = "retrieval"
    residual: int = 16
    group: int = NEVER
    tier: str = "ram"
    dir: str = ""
    fetch: int = 0
    fixed_window: ClassVar[bool] = False  # decoded tokens stay in the hot window: ``group`` is not a parameter

    @property
    def retrieves(self) -> bool:
        return True

    def check(self) -> None:
        super().check()
        if self.tier not in BACKENDS:
            raise KVSqueezeError(f"{self.name}: unknown tier {self.tier!r}; use tier=ram or tier=disk")
        if self.fetch < 0:
            raise KVSqueezeError(f"{self.name}: fetch must be >= 0 tokens, got {self.fetch}")
        if self.fixed_window and self.group != NEVER:
            raise KVSqueezeError(f"{self.name} keeps decoded tokens in its hot window; drop group=")

    def check_setup(self, head_dim: int) -> None:
        super().check_setup(head_dim)
        if self.tier == "disk":
            check_directory(self.dir or None)

    def store_for(self, device) -> ColdStore:
        """The cold store of a block (the disk tier's directory is checked here, where it is used)."""
        if self.tier == "disk":
            check_directory(self.dir or None)
        return ColdStore(self.tier, self.dir or None, device)

    def fetch_tokens(self, ctx: LayerContext | None, overhead: float, unit: int, what: str) -> int | None:
        """Tokens per head each step may fetch: the hot budget (tokens of the full cache per head) less
        ``overhead`` (hot tokens-equivalent held at rest: summaries and the window); None = everything. ``unit``:
        the fetch granularity (page or chunk), ``what`` names the overhead in the refusal."""
        if self.fetch:
            return self.fetch
        if ctx is None or ctx.scores is not None:
            return None  # a flushed block (decoding), or a scorer chose the kept tokens: fetch what is stored
        budget = int(ctx.keep.min())
        if budget >= int(ctx.valid.sum(-1).max()):
            return None  # nothing to save
        room = budget - overhead
        if room < unit:
            raise KVSqueezeError(
                f"{self.name}: the budget of {budget} hot tokens per head leaves no room to fetch one {unit}-token "
                f"page after {what} ({overhead:.0f} tokens' worth); use a smaller ratio, a larger budget, a smaller "
                "window (residual=) or larger pages"
            )
        return int(room)


def top_pages(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best pages per (row, head) of ``scores [B, H, P]`` (-inf = unusable): indices ``[B, H, k]`` and
    whether each selected page is usable."""
    k = min(k, scores.shape[-1])
    values, index = torch.topk(scores, k, dim=-1, sorted=False)
    return index, torch.isfinite(values)
