"""Time as a dependency: parts take a Clock so tests can drive time."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class SystemClock:
    """The real clock: `monotonic()` for intervals, `wall()` (epoch seconds) for display.

    The time functions themselves, not methods wrapping them: the engine reads the clock
    about nine times per message, and a Python-level wrapper doubled each read's cost."""

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)
