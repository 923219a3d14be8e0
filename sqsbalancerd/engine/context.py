"""What a running handler can know about its time, like Lambda's get_remaining_time_in_millis.

The worker sets the context around each handler call (inside the task for async handlers:
contextvars do not cross into the loop thread on their own).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from sqsbalancerd.clock import Clock
from sqsbalancerd.engine.state import Delivery, WorkItem

# Requests an extension: (deliveries, new visibility timeout in seconds).
ExtendRequest = Callable[[Sequence[Delivery], int], None]

_current: contextvars.ContextVar[HandlerContext | None] = contextvars.ContextVar(
    "sqsbalancerd_handler_context", default=None
)


class HandlerContext:
    """Time left for the message(s) of the running handler call."""

    def __init__(self, item: WorkItem, *, clock: Clock, request_extension: ExtendRequest) -> None:
        self._item = item
        self._clock = clock
        self._request_extension = request_extension

    @property
    def attempt(self) -> int:
        """The handler call this is for the (first) message: receives plus in-process retries."""
        return self._item.deliveries[0].message.attempt

    def remaining_s(self) -> float:
        """Seconds until the daemon stops protecting this call: the extension budget
        (`sqs.max_extension`) or `handler_timeout`, whichever ends first. Past it the
        message is no longer extended and the call's result is discarded."""
        now = self._clock.monotonic()
        budgets = [
            d.received_at_s + d.queue.policy.max_extension_s - now for d in self._item.deliveries
        ]
        if self._item.deadline_s is not None:
            budgets.append(self._item.deadline_s - now)
        return max(0.0, min(budgets))

    def visibility_remaining_s(self) -> float:
        """Seconds until the current visibility timeout runs out (it is renewed on its own
        before that, within remaining_s())."""
        now = self._clock.monotonic()
        return max(0.0, min(d.visible_until_s for d in self._item.deliveries) - now)

    def extend(self, seconds: float) -> float:
        """Keep the message(s) invisible for at least `seconds` from now, within the
        extension budget; returns the seconds granted (0 when the budget is spent). The
        call is sent at once, ahead of the periodic renewal."""
        granted = int(min(seconds, self.remaining_s(), 43_200))
        if granted < 1:
            return 0.0
        now = self._clock.monotonic()
        due = [
            d for d in self._item.deliveries if d.is_undecided and d.visible_until_s < now + granted
        ]
        if due:
            self._request_extension(due, granted)
        return float(granted)


def handler_context() -> HandlerContext:
    """The context of the handler call running in this thread or task."""
    context = _current.get()
    if context is None:
        raise LookupError("handler_context() is only available inside a handler call")
    return context


@contextmanager
def entered(context: HandlerContext | None) -> Iterator[None]:
    token = _current.set(context)
    try:
        yield
    finally:
        _current.reset(token)


def enter(context: HandlerContext | None) -> contextvars.Token[HandlerContext | None]:
    """`entered` without the generator (the worker's per-message path); undo with `leave`."""
    return _current.set(context)


def leave(token: contextvars.Token[HandlerContext | None]) -> None:
    _current.reset(token)
