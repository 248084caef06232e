"""A progress hook for long library calls (calibrations): the library reports steps, a front end draws them.

The library never imports a UI package; ``kvsqueeze calibrate …`` passes a rich progress bar with an ETA.
"""

from __future__ import annotations

from typing import Protocol


class Steps(Protocol):
    """Receives ``start(description, total)`` once per phase, then ``advance()`` after each finished step."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...


class NoProgress:
    """The default hook: reports nothing."""

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


NO_PROGRESS = NoProgress()
