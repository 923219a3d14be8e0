"""handler_timeout, the handler context (remaining time, extend) and a blocked event loop.

Real threads on the real clock (ThreadSupervisor) against in-process moto: a timeout is a
race between a handler and the engine's own loops, which a fake clock would hide.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import pytest
from enginekit import CallLog, standalone_settings
from support import queue_depth, wait_until

from sqsbalancerd import Message, handler_context
from sqsbalancerd.clock import SystemClock
from sqsbalancerd.discovery import QueueInfo
from sqsbalancerd.engine.consumer import Engine, HandlerSet
from sqsbalancerd.handler import ResolvedHandler
from sqsbalancerd.runtime import ThreadSupervisor
from sqsbalancerd.stats import Stats

PATH = "tests.engine.test_time_limits:handler"


@pytest.fixture
def engine_for(moto_sqs: Any) -> Iterator[Callable[..., Engine]]:
    built: list[tuple[Engine, ThreadSupervisor]] = []

    def build(function: Callable[..., Any], *, is_async: bool = False, **workers: Any) -> Engine:
        settings = standalone_settings(
            sqs={"wait_time_seconds": 1},
            workers={"pool_size": 2, "queue_size": 5, **workers},
            retry={"base": 0},
        )
        resolved = ResolvedHandler(path=PATH, function=function, is_async=is_async, is_batch=False)
        supervisor = ThreadSupervisor()
        engine = Engine(
            sqs=moto_sqs,
            settings=settings,
            handlers=HandlerSet(default=resolved, by_path={}),
            stats=Stats(),
            clock=SystemClock(),
            spawner=supervisor,
        )
        engine.start()
        built.append((engine, supervisor))
        return engine

    yield build
    for engine, supervisor in built:
        engine.stop_receiving()
        engine.stop(timeout_s=5)
        assert supervisor.stop_all(timeout_s=10) == []


def queue(sqs: Any, name: str = "work-a") -> QueueInfo:
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "30"})["QueueUrl"]
    return QueueInfo(name=name, url=url, visibility_timeout_s=30)


def counters(engine: Engine, name: str) -> dict[str, int]:
    return next(asdict(q) for q in engine.snapshot("t").queues if q.queue == name)


def test_a_sync_handler_past_its_timeout_is_released_at_once_and_its_result_discarded(
    moto_sqs, engine_for, caplog
):
    release = threading.Event()
    calls: list[str] = []

    def slow(message: Message) -> None:
        calls.append(message.message_id)
        if len(calls) == 1:
            assert release.wait(30)

    engine = engine_for(slow, handler_timeout=1.0)
    info = queue(moto_sqs)
    log = CallLog(moto_sqs)
    moto_sqs.send_message(QueueUrl=info.url, MessageBody="slow")
    engine.set_owned([info])
    # Released well before its 30 s visibility timeout: the second call is the same message.
    wait_until(lambda: len(calls) >= 2, timeout_s=10, what="the message handled again")
    assert calls[0] == calls[1]
    assert engine.stuck_slots() == 1  # the first call still occupies its slot
    release.set()
    wait_until(lambda: engine.stuck_slots() == 0, timeout_s=5, what="the slot freed")
    wait_until(lambda: queue_depth(moto_sqs, info.url) == (0, 0), timeout_s=5, what="deleted")
    assert counters(engine, "work-a")["timed_out"] == 1
    assert counters(engine, "work-a")["deleted"] == 1  # only the second call's
    [line] = [r for r in caplog.records if "timed out" in r.getMessage()]
    assert line.queue == "work-a" and line.message_id == calls[0]
    assert [e["VisibilityTimeout"] for e in log.entries("ChangeMessageVisibilityBatch")][:1] == [0]


def test_an_async_handler_past_its_timeout_is_cancelled(moto_sqs, engine_for, caplog):
    cancelled = threading.Event()
    calls: list[int] = []

    async def slow(message: Message) -> None:
        calls.append(message.attempt)
        if len(calls) == 1:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

    engine = engine_for(slow, is_async=True, handler_timeout=1.0)
    info = queue(moto_sqs)
    moto_sqs.send_message(QueueUrl=info.url, MessageBody="slow")
    engine.set_owned([info])
    assert cancelled.wait(10)
    wait_until(lambda: queue_depth(moto_sqs, info.url) == (0, 0), timeout_s=15, what="retried")
    assert counters(engine, "work-a")["timed_out"] == 1
    assert counters(engine, "work-a")["failed"] == 1
    assert any("timed out" in r.getMessage() for r in caplog.records)


def test_a_blocking_call_inside_async_def_is_detected(moto_sqs, engine_for, caplog):
    caplog.set_level(logging.ERROR)
    done = threading.Event()

    async def blocking(message: Message) -> None:
        time.sleep(2.5)  # blocks the handlers' event loop
        done.set()

    engine = engine_for(blocking, is_async=True)
    info = queue(moto_sqs)
    moto_sqs.send_message(QueueUrl=info.url, MessageBody="x")
    engine.set_owned([info])
    lags: list[float] = []

    def lag_seen() -> bool:
        lags.append(engine.snapshot("t").event_loop_lag_s or 0.0)
        return lags[-1] > 1.0

    wait_until(lag_seen, timeout_s=10, what="the loop's lag to show")
    assert done.wait(10)
    wait_until(
        lambda: any("blocking the handlers' event loop" in r.getMessage() for r in caplog.records),
        timeout_s=5,
        what="the blocked-loop line",
    )
    lines = [r for r in caplog.records if "blocking the handlers' event loop" in r.getMessage()]
    assert len(lines) == 1 and lines[0].handler == PATH  # once, naming the handler
    wait_until(lambda: (engine.snapshot("t").event_loop_lag_s or 0) < 1.0, timeout_s=5)


def test_the_handler_can_read_its_remaining_time_and_extend(moto_sqs, engine_for):
    seen: dict[str, float] = {}

    def handler(message: Message) -> None:
        context = handler_context()
        seen["remaining"] = context.remaining_s()
        seen["visibility"] = context.visibility_remaining_s()
        seen["granted"] = context.extend(120)
        wait_until(lambda: handler_context().visibility_remaining_s() > 100, timeout_s=5)
        seen["after"] = context.visibility_remaining_s()

    engine = engine_for(handler, handler_timeout=600.0)
    info = queue(moto_sqs)
    log = CallLog(moto_sqs)
    moto_sqs.send_message(QueueUrl=info.url, MessageBody="x")
    engine.set_owned([info])
    wait_until(lambda: "after" in seen, timeout_s=10, what="the handler to finish")
    assert 590 < seen["remaining"] <= 600  # handler_timeout is nearer than max_extension
    assert 25 < seen["visibility"] <= 30
    assert seen["granted"] == 120
    assert 100 < seen["after"] <= 120
    assert 120 in [e["VisibilityTimeout"] for e in log.entries("ChangeMessageVisibilityBatch")]


def test_handler_context_outside_a_handler_is_an_error():
    with pytest.raises(LookupError, match="only available inside a handler"):
        handler_context()


def test_a_blocked_async_handler_past_its_timeout_counts_one_timeout(moto_sqs, engine_for):
    """The watchdog times out a call whose loop is blocked (it cannot be cancelled); once the
    loop runs again the call's own timeout fires too: still one timed-out message."""
    calls: list[int] = []
    finished = threading.Event()

    async def blocking(message: Message) -> None:
        calls.append(message.attempt)
        if len(calls) == 1:
            try:
                time.sleep(1.0 + 2.0 + 1.5)  # past timeout + the cancel grace, loop blocked
                await asyncio.sleep(5)  # the expired timeout cancels it here
            finally:
                finished.set()

    engine = engine_for(blocking, is_async=True, handler_timeout=1.0)
    info = queue(moto_sqs)
    moto_sqs.send_message(QueueUrl=info.url, MessageBody="x")
    engine.set_owned([info])
    assert finished.wait(15)
    wait_until(lambda: queue_depth(moto_sqs, info.url) == (0, 0), timeout_s=15, what="handled")
    wait_until(lambda: engine.stuck_slots() == 0, timeout_s=5, what="the slot freed")
    assert len(calls) == 2
    assert counters(engine, "work-a")["timed_out"] == 1
