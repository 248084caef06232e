"""Retrieval methods: everything kept in a cold tier, hot summaries choose what each decoding step brings back
(one paper per module; the tiers themselves are :mod:`kvsqueeze.core.tiers`)."""

from kvsqueeze.retrieval import a2ats, actqkv, icecache, leoam, louiskv, quest, sentencekv, shadowkv
from kvsqueeze.retrieval.base import RetrievalCodec

__all__ = ["RetrievalCodec", "a2ats", "actqkv", "icecache", "leoam", "louiskv", "quest", "sentencekv", "shadowkv"]
