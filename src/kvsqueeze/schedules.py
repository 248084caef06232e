"""The schedule axis: when a layer is compressed."""

from __future__ import annotations

from kvsqueeze.spec import Component, register


class Schedule(Component):
    axis = "schedule"

    def due(self, layer, q_len: int) -> bool:
        """Whether ``layer`` should be compressed after the forward pass that just attended."""
        raise NotImplementedError


@register
class PrefillSchedule(Schedule):
    """Compress once, right after the first forward pass (the prompt or context prefill)."""

    name = "prefill"
    family = "schedule"
    paper = "one-shot compression after prefill (default)"

    def due(self, layer, q_len: int) -> bool:
        return not layer.compressed
