"""The worker pool: take an item, run the user's handler, turn the outcome into acks.

Return → delete. Raise → visible again per [retry]. `Retry(after=…)` → visible after that.
Any BaseException from a handler is a failed message; it never ends a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections.abc import Callable, Collection, Iterable
from contextlib import AbstractContextManager
from typing import Any

from sqsbalancerd.clock import Clock
from sqsbalancerd.engine.acks import Acknowledger
from sqsbalancerd.engine.dispatch import Dispatcher
from sqsbalancerd.engine.state import Delivery, DeliveryState, WorkItem
from sqsbalancerd.errors import Retry
from sqsbalancerd.handler import BatchResult
from sqsbalancerd.message import Message
from sqsbalancerd.observability.logging import log_context
from sqsbalancerd.stats import Stats

logger = logging.getLogger(__name__)

# Wraps one handler call, e.g. in an OpenTelemetry span (observability/otel.py).
Tracing = Callable[[Message], AbstractContextManager[None]]


class AsyncBridge:
    """The one event loop that runs `async def` handlers; the runtime owns its thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()

    def run(self, stop: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        watcher = self.loop.run_in_executor(None, stop.wait)
        watcher.add_done_callback(lambda _: self.loop.stop())
        self.loop.run_forever()

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._started.clear()

    def call(self, awaitable: Any) -> Any:
        if not self._started.wait(5.0):
            raise RuntimeError("the async handler loop is not running")
        return asyncio.run_coroutine_threadsafe(awaitable, self.loop).result()


class Outcome:
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRY = "retry"


class Worker:
    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        acks: Acknowledger,
        stats: Stats,
        clock: Clock,
        bridge: AsyncBridge | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._acks = acks
        self._stats = stats
        self._clock = clock
        self._bridge = bridge
        self._tracing = tracing
        self.last_tick_s = clock.monotonic()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.run_once()

    def run_once(self, *, timeout_s: float = 0.5) -> bool:
        self.last_tick_s = self._clock.monotonic()
        item = self._dispatcher.take(timeout_s=timeout_s)
        if item is None:
            return False
        try:
            self.execute(item)
        finally:
            self._dispatcher.finish(item)
        return True

    def execute(self, item: WorkItem) -> None:
        queue = item.queue
        now_wall = self._clock.wall()
        for delivery in item.deliveries:
            sent_at = delivery.message.sent_timestamp_s
            if sent_at is not None:
                self._stats.observe_age(queue.name, max(0.0, now_wall - sent_at))
        started = self._clock.monotonic()
        failures, retry_after = self._invoke(item)
        self._stats.observe_handler(queue.name, self._clock.monotonic() - started)
        self._settle(item, failures, retry_after)

    def _invoke(self, item: WorkItem) -> tuple[set[str], dict[str, float]]:
        """Run the handler; returns (failed message ids, explicit Retry delays by id)."""
        queue = item.queue
        ids = [d.message.message_id for d in item.deliveries]
        first = item.deliveries[0].message
        context = {"queue": queue.name, "message_id": first.message_id if len(ids) == 1 else None}
        span = self._tracing(first) if self._tracing else contextlib.nullcontext()
        with log_context(**context), span:
            try:
                if queue.is_batch:
                    result = self._call(queue.invoke, [d.message for d in item.deliveries], context)
                    return _batch_failures(result, ids), {}
                self._call(queue.invoke, first, context)
                return set(), {}
            except Retry as retry:
                return set(ids), dict.fromkeys(ids, retry.after)
            except BaseException as exc:  # handlers may raise anything, SystemExit included
                logger.error(
                    "handler failed",
                    exc_info=not isinstance(exc, SystemExit | KeyboardInterrupt),
                    extra={"error": f"{type(exc).__name__}: {exc}"[:300], "count": len(ids)},
                )
                return set(ids), {}

    def _call(self, function: Any, argument: Any, context: dict[str, Any]) -> Any:
        result = function(argument)
        if inspect.isawaitable(result):
            awaitable = _in_log_context(result, context)
            if self._bridge is None:
                # A sync callable returned an awaitable (a wrapped `async def`, say): the daemon
                # has no handlers' loop (no handler is declared async), so run it here.
                return asyncio.run(awaitable)
            result = self._bridge.call(awaitable)
        return result

    def _settle(self, item: WorkItem, failures: set[str], retry_after: dict[str, float]) -> None:
        queue = item.queue
        succeeded = [d for d in item.deliveries if d.message.message_id not in failures]
        failed = [d for d in item.deliveries if d.message.message_id in failures]
        if queue.info.is_fifo and failed:
            succeeded, failed = _fifo_split(item.deliveries, failures)
        kept_ok = self._dispatcher.settle(succeeded, DeliveryState.DONE)
        kept_failed = self._dispatcher.settle(failed, DeliveryState.DONE)
        expired = len(item.deliveries) - len(kept_ok) - len(kept_failed)
        if expired:
            logger.warning(
                "handler returned after max_extension; result discarded",
                extra={"queue": queue.name, "count": expired},
            )
        if kept_ok:
            self._stats.count(queue.name, "succeeded", len(kept_ok))
            self._acks.delete(kept_ok)
        for delivery in kept_failed:
            self._retry(delivery, retry_after.get(delivery.message.message_id))
        if queue.info.is_fifo:
            for group in {d.message.group_id for d in kept_failed if d.message.group_id}:
                self._release(self._dispatcher.drop_group(queue, group))

    def _retry(self, delivery: Delivery, explicit_after_s: float | None) -> None:
        queue = delivery.queue
        self._stats.count(queue.name, "failed")
        delay_s = (
            explicit_after_s
            if explicit_after_s is not None
            else queue.policy.retry.delay_s(delivery.message.receive_count)
        )
        if delay_s is None:
            return  # backoff "none": it reappears when its visibility timeout runs out
        self._stats.count(queue.name, "retried")
        self._acks.change_visibility([delivery], round(delay_s), reason="retry")

    def _release(self, deliveries: list[Delivery]) -> None:
        if deliveries:
            self._acks.change_visibility(deliveries, 0, reason="release")


class _HandlerExit(Exception):
    """Carries a SystemExit/KeyboardInterrupt out of an async handler.

    asyncio re-raises those two out of `run_forever`: left alone, they would stop the
    handlers' loop for good and leave the waiting worker blocked forever.
    """

    def __init__(self, original: BaseException) -> None:
        super().__init__(repr(original))
        self.original = original


async def _in_log_context(awaitable: Any, context: dict[str, Any]) -> Any:
    # contextvars do not cross into the loop thread: enter the context inside the task.
    with log_context(**context):
        try:
            return await awaitable
        except (SystemExit, KeyboardInterrupt) as exc:
            raise _HandlerExit(exc) from exc


def _batch_failures(result: Any, ids: Collection[str]) -> set[str]:
    if result is None or result is True:
        return set()
    if isinstance(result, BatchResult):
        return set(result.failed_message_ids) & set(ids)
    if isinstance(result, str):
        return {result} & set(ids)
    if isinstance(result, Iterable):
        return {str(x) for x in result} & set(ids)
    # False, a number, any other object: not a documented answer. Deleting on it could lose
    # the batch, so it fails (the handler-failed line names what came back).
    raise TypeError(
        f"batch handler returned {type(result).__name__}; expected None, a BatchResult "
        "or an iterable of failed message ids"
    )


def _fifo_split(
    deliveries: Iterable[Delivery], failures: set[str]
) -> tuple[list[Delivery], list[Delivery]]:
    """In a FIFO batch, everything after a group's first failure fails with it (order)."""
    ok: list[Delivery] = []
    failed: list[Delivery] = []
    broken: set[str | None] = set()
    for delivery in deliveries:
        group = delivery.message.group_id
        if delivery.message.message_id in failures or group in broken:
            failed.append(delivery)
            broken.add(group)
        else:
            ok.append(delivery)
    return ok, failed
