"""``interval``: recompress to a fixed budget every ``every`` generated tokens, with the method's scorer.

Scorers that need only recent queries (SnapKV, TOVA, Knorm, KeyDiff, StreamingLLM …) see the last ``window``
queries. A scorer that gathers decoding statistics (H2O's attention accumulated by every query since the prompt)
does so through its own ``observe`` hook, which this schedule calls after every forward pass.
"""

from __future__ import annotations

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policies.base import Scorer
from kvsqueeze.schedules.base import CacheView, DecodingSchedule
from kvsqueeze.spec import register


@register
class IntervalSchedule(DecodingSchedule):
    name = "interval"
    paper = "decoding-time recompression every N tokens (DecodingPress-style; H2O's greedy decode eviction)"

    def tracker(self, cache: CacheView):
        scorer = cache.method.scorer
        return scorer if hasattr(scorer, "observe") else None

    def scorer(self, cache: CacheView) -> Scorer:
        if not cache.method.evicts:
            raise KVSqueezeError("interval needs a scorer: write e.g. 'h2o+interval:every=16,budget=256'")
        return cache.method.scorer
