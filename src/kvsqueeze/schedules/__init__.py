"""Schedules: when compression runs (once after prefill, or during decoding)."""

from kvsqueeze.schedules import base, blockwise, interval, lazyeviction, triattention
from kvsqueeze.schedules.base import DecodingSchedule, Schedule

__all__ = ["DecodingSchedule", "Schedule", "base", "blockwise", "interval", "lazyeviction", "triattention"]
