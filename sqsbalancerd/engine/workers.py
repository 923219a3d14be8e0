"""The worker pool: take an item, run the user's handler, hand the outcome to the settler.

Return → delete. Raise → visible again per [retry]. `Retry(after=…)` → visible after that.
Any BaseException from a handler is a failed message; it never ends a worker.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from sqsbalancerd.clock import Clock
from sqsbalancerd.engine.acks import Acknowledger
from sqsbalancerd.engine.context import HandlerContext, enter, entered, leave
from sqsbalancerd.engine.dispatch import Dispatcher
from sqsbalancerd.engine.settle import Settler
from sqsbalancerd.engine.state import Delivery, WorkItem
from sqsbalancerd.errors import Retry
from sqsbalancerd.handler import UnreadableBatchAnswer, read_batch_answer
from sqsbalancerd.message import Message
from sqsbalancerd.observability.logging import log_context, pop_context, push_context
from sqsbalancerd.stats import Stats

logger = logging.getLogger(__name__)

# The event loop's beat: its lag is measured against this period.
LOOP_BEAT_S = 0.25

# Wraps one handler call, e.g. in an OpenTelemetry span (observability/otel.py).
Tracing = Callable[[Message], AbstractContextManager[None]]


class AsyncBridge:
    """The one event loop that runs `async def` handlers; the runtime owns its thread.

    A beat scheduled on the loop measures its lag: a handler that blocks the loop (a
    `time.sleep` inside `async def`) stops the beat, and `lag_s` grows.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._clock = clock
        self._last_beat_s: float | None = None
        self._paths: dict[asyncio.Task[Any], str] = {}

    def run(self, stop: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.call_soon(self._beat)
        watcher = self.loop.run_in_executor(None, stop.wait)
        watcher.add_done_callback(lambda _: self.loop.stop())
        self.loop.run_forever()

    def _beat(self) -> None:
        self._last_beat_s = self._now()
        self.loop.call_later(LOOP_BEAT_S, self._beat)

    def _now(self) -> float:
        return self._clock.monotonic() if self._clock else time.monotonic()

    def lag_s(self) -> float:
        """How long the loop has gone without running its beat, past the beat's period."""
        if self._last_beat_s is None or not self.loop.is_running():
            return 0.0
        return max(0.0, self._now() - self._last_beat_s - LOOP_BEAT_S)

    def running_paths(self) -> list[str]:
        """The handler paths of the tasks on the loop, the one running now first."""
        current = asyncio.current_task(self.loop)  # read from another thread: best effort
        paths = dict(self._paths)
        first = [paths.pop(current)] if current in paths else []
        return first + sorted(set(paths.values()))

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._started.clear()

    def call(self, awaitable: Any, *, path: str = "") -> Any:
        if not self._started.wait(5.0):
            raise RuntimeError("the async handler loop is not running")
        return asyncio.run_coroutine_threadsafe(self._tracked(awaitable, path), self.loop).result()

    async def _tracked(self, awaitable: Any, path: str) -> Any:
        task = asyncio.current_task()
        if task is not None:
            self._paths[task] = path
        try:
            return await awaitable
        finally:
            if task is not None:
                self._paths.pop(task, None)


class HandlerTimedOut(Exception):
    """An async handler ran past handler_timeout and was cancelled."""


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
        settler: Settler | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._settler = settler or Settler(
            dispatcher=dispatcher, acks=acks, stats=stats, clock=clock
        )
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
        ages = []
        for delivery in item.deliveries:
            message = delivery.message
            sent_at = message.sent_timestamp_s
            if sent_at is not None and message.attempt == message.receive_count:
                ages.append(max(0.0, now_wall - sent_at))
        started = self._clock.monotonic()
        failures, retry_after = self._invoke(item)
        # One lock for the call's figures, not one per figure (this runs per message).
        self._stats.observe_call(queue.name, self._clock.monotonic() - started, ages)
        self._settler.settle(item, failures, retry_after)

    def _invoke(self, item: WorkItem) -> tuple[set[str], dict[str, float]]:
        """Run the handler; returns (failed message ids, explicit Retry delays by id)."""
        queue = item.queue
        deliveries = item.deliveries
        first = deliveries[0].message
        fields = {
            "queue": queue.name,
            "message_id": first.message_id if len(deliveries) == 1 else None,
        }
        context = HandlerContext(item, clock=self._clock, request_extension=self._extend_now)
        # Tokens, not context managers: this runs per message (see push_context).
        log_token = push_context(fields)
        try:
            if self._tracing is None:
                return self._invoke_in(item, first, fields, context)
            with self._tracing(first):
                return self._invoke_in(item, first, fields, context)
        finally:
            pop_context(log_token)

    def _invoke_in(
        self, item: WorkItem, first: Message, fields: dict[str, Any], context: HandlerContext
    ) -> tuple[set[str], dict[str, float]]:
        queue = item.queue
        try:
            if queue.is_batch:
                messages = [d.message for d in item.deliveries]
                answer = self._call(item, messages, fields, context)
                return self._read_answer(item, answer, messages), {}
            self._call(item, first, fields, context)
            return set(), {}
        except Retry as retry:
            ids = [d.message.message_id for d in item.deliveries]
            return set(ids), dict.fromkeys(ids, retry.after)
        except HandlerTimedOut:
            self._log_timeout(item, "handler timed out; cancelled")
            return {d.message.message_id for d in item.deliveries}, {}
        except BaseException as exc:  # handlers may raise anything, SystemExit included
            logger.error(
                "handler failed",
                exc_info=not isinstance(exc, SystemExit | KeyboardInterrupt),
                extra={
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                    "count": len(item.deliveries),
                },
            )
            return {d.message.message_id for d in item.deliveries}, {}

    def _read_answer(self, item: WorkItem, answer: Any, messages: list[Message]) -> set[str]:
        try:
            return set(read_batch_answer(answer, messages))
        except UnreadableBatchAnswer as exc:
            # Deleting on a guess could lose messages the handler meant to fail.
            logger.error(
                "batch handler answer unreadable; the whole batch fails",
                extra={"error": str(exc)[:300], "count": len(messages)},
            )
            self._stats.count(item.queue.name, "answer_unreadable")
            return {m.message_id for m in messages}

    def _log_timeout(self, item: WorkItem, text: str) -> None:
        if self._dispatcher.claim_timeout(item):  # the watchdog may have counted it already
            self._stats.count(item.queue.name, "timed_out", len(item.deliveries))
        logger.warning(
            text,
            extra={
                "queue": item.queue.name,
                "message_id": item.deliveries[0].message.message_id,
                "count": len(item.deliveries),
                "timeout_s": item.queue.policy.handler_timeout_s,
            },
        )

    def _call(
        self, item: WorkItem, argument: Any, fields: dict[str, Any], context: HandlerContext
    ) -> Any:
        token = enter(context)
        try:
            result = item.queue.invoke(argument)
        finally:
            leave(token)
        # Most handlers return None (or a batch answer): skip isawaitable's ABC check then.
        if result is not None and inspect.isawaitable(result):
            timeout_s = None
            if item.deadline_s is not None:
                timeout_s = max(0.0, item.deadline_s - self._clock.monotonic())
            awaitable = _in_context(result, fields, context, timeout_s)
            if self._bridge is None:
                # A sync callable returned an awaitable (a wrapped `async def`, say): the daemon
                # has no handlers' loop (no handler is declared async), so run it here.
                return asyncio.run(awaitable)
            result = self._bridge.call(awaitable, path=item.queue.handler_path)
        return result

    def _extend_now(self, deliveries: Sequence[Delivery], timeout_s: int) -> None:
        self._acks.change_visibility(deliveries, timeout_s, reason="extend")


class _HandlerExit(Exception):
    """Carries a SystemExit/KeyboardInterrupt out of an async handler.

    asyncio re-raises those two out of `run_forever`: left alone, they would stop the
    handlers' loop for good and leave the waiting worker blocked forever.
    """

    def __init__(self, original: BaseException) -> None:
        super().__init__(repr(original))
        self.original = original


async def _in_context(
    awaitable: Any, fields: dict[str, Any], context: HandlerContext, timeout_s: float | None
) -> Any:
    # contextvars do not cross into the loop thread: enter the contexts inside the task.
    with log_context(**fields), entered(context):
        try:
            if timeout_s is None:
                return await awaitable
            async with asyncio.timeout(timeout_s) as scope:
                return await awaitable
        except TimeoutError:
            if timeout_s is not None and scope.expired():
                raise HandlerTimedOut() from None
            raise
        except (SystemExit, KeyboardInterrupt) as exc:
            raise _HandlerExit(exc) from exc
