"""`coordination.mode = "standalone"`: this process owns every discovered queue."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from sqsbalancerd.discovery import DiscoveryResult, QueueInfo
from sqsbalancerd.stats import CoordinationStats


class StandaloneCoordinator:
    def __init__(self, *, set_owned: Callable[[Iterable[QueueInfo]], None]) -> None:
        self._set_owned = set_owned

    def start(self) -> None:
        """Nothing to register: there is no one to share with."""

    def on_discovered(self, result: DiscoveryResult) -> None:
        self._set_owned(result.matched)

    def on_released(self, queue_name: str) -> None:
        """Standalone releases a queue only when it disappeared; nothing to record."""

    def begin_drain(self) -> None:
        """Nothing to announce."""

    def leave(self) -> None:
        """Nothing to hand over."""

    def snapshot(self) -> CoordinationStats | None:
        return None
