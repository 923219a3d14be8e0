"""The receivers of one owned queue: one long poll always, more while the queue is hot.

One poller caps a queue at ten messages per round trip whatever the workers. While every
receive comes back full and the queue's share has room for another full receive, another
poller joins (up to enough to keep the pool busy); an extra poller leaves as soon as a
receive is not full. Idle queues keep exactly one long poll each.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from sqsbalancerd.engine.dispatch import Dispatcher
from sqsbalancerd.engine.poller import Poller
from sqsbalancerd.engine.state import QueueRuntime

# Extra pollers per queue, at most (beside the first).
MAX_EXTRA_RECEIVERS = 7


class ThreadHandle(Protocol):
    def is_alive(self) -> bool: ...

    def join(self, timeout: float | None = None) -> None: ...


Spawn = Callable[[str, Callable[[threading.Event], None], threading.Event], ThreadHandle]


@dataclass(slots=True, eq=False)
class Receivers:
    queue: QueueRuntime
    make_poller: Callable[[bool], Poller]  # is_extra -> a poller for this queue
    spawn: Spawn
    stop: threading.Event = field(default_factory=threading.Event)
    pollers: list[Poller] = field(default_factory=list)
    threads: list[ThreadHandle] = field(default_factory=list)

    def start(self) -> None:
        self._add(is_extra=False)

    def _add(self, *, is_extra: bool) -> None:
        poller = self.make_poller(is_extra)
        name = f"poller:{self.queue.name}" + (f"#{len(self.threads)}" if is_extra else "")
        self.pollers.append(poller)
        self.threads.append(self.spawn(name, poller.run, self.stop))

    def is_alive(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def scale(self, dispatcher: Dispatcher, pool_size: int) -> None:
        """Called periodically: drop ended extras, add one if every receiver runs full."""
        self._prune()
        if self.stop.is_set() or self.queue.is_stopping or not self.pollers:
            return
        if not all(p.was_full for p in self.pollers):
            return
        wanted = min(MAX_EXTRA_RECEIVERS + 1, math.ceil(pool_size / self.queue.policy.max_messages))
        if len(self.pollers) < wanted and dispatcher.has_room_for(
            self.queue, self.queue.policy.max_messages
        ):
            self._add(is_extra=True)

    def _prune(self) -> None:
        kept = [(p, t) for p, t in zip(self.pollers, self.threads, strict=True) if t.is_alive()]
        if len(kept) < len(self.pollers) and kept:
            self.pollers = [p for p, _ in kept]
            self.threads = [t for _, t in kept]
