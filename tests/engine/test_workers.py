"""Workers against moto: handler outcomes become deletes or visibility changes."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import replace
from typing import Any

import pytest
from enginekit import CallLog, Rig
from support import FakeClock

from sqsbalancerd import BatchResult, Message, Retry, batch
from sqsbalancerd.config import RetrySettings
from sqsbalancerd.engine.workers import AsyncBridge
from sqsbalancerd.runtime import ThreadSupervisor


class Recorder:
    """A sync handler: records what it got, then does what `behave(message)` says."""

    def __init__(self, behave: Any = None) -> None:
        self.seen: list[Message] = []
        self._behave = behave

    def __call__(self, message: Message) -> Any:
        self.seen.append(message)
        if self._behave is not None:
            return self._behave(message)
        return None

    @property
    def bodies(self) -> list[str]:
        return [m.body for m in self.seen]


def fail_on(*bodies: str) -> Any:
    def behave(message: Message) -> None:
        if message.body in bodies:
            raise ValueError(f"failing {message.body} on purpose")

    return behave


def timeouts_sent(log: CallLog) -> list[int]:
    return [e["VisibilityTimeout"] for e in log.entries("ChangeMessageVisibilityBatch")]


def test_return_deletes_the_message(moto_sqs):
    handler = Recorder()
    rig = Rig(moto_sqs, handler=handler, clock=FakeClock())
    [message_id] = rig.send('{"n": 1}')
    assert rig.receive() == 1
    assert rig.work()
    rig.flush()
    assert [m.message_id for m in handler.seen] == [message_id]
    assert handler.seen[0].json() == {"n": 1}
    assert rig.depth() == (0, 0)
    assert rig.counters()["succeeded"] == 1
    assert rig.counters()["deleted"] == 1


def test_raise_makes_it_visible_again_per_backoff(moto_sqs):
    rig = Rig(moto_sqs, handler=Recorder(fail_on("x")), clock=FakeClock())
    log = CallLog(moto_sqs)
    rig.send("x")
    rig.receive()
    assert rig.work()
    rig.flush()
    assert timeouts_sent(log) == [5]  # base 5 · 2^0
    assert not log.of("DeleteMessageBatch")
    assert rig.depth() == (0, 1)
    assert rig.counters()["failed"] == 1
    assert rig.counters()["retried"] == 1


def test_raise_with_zero_backoff_is_visible_again_at_once(moto_sqs):
    handler = Recorder(fail_on("x"))
    rig = Rig(moto_sqs, handler=handler, clock=FakeClock(), retry=RetrySettings(base=0))
    rig.send("x")
    rig.receive()
    rig.work()
    rig.flush()
    assert rig.depth() == (1, 0)
    rig.receive()
    rig.work()
    assert [m.receive_count for m in handler.seen] == [1, 2]


@pytest.mark.parametrize(
    ("receive_count", "expected_s"),
    [(1, 5), (2, 10), (3, 20), (5, 80), (8, 640), (9, 900), (40, 900)],
)
def test_backoff_is_min_of_max_and_base_times_two_to_the_receive_count(
    moto_sqs, receive_count, expected_s
):
    rig = Rig(moto_sqs, handler=Recorder(fail_on("x")), clock=FakeClock())
    log = CallLog(moto_sqs)
    rig.send("x")
    rig.receive()
    [item] = rig.queue.queued
    delivery = item.deliveries[0]
    delivery.message = replace(delivery.message, receive_count=receive_count)
    rig.work()
    rig.flush()
    assert timeouts_sent(log) == [expected_s]


def test_backoff_none_leaves_the_message_to_its_visibility_timeout(moto_sqs):
    retry = RetrySettings(backoff="none")
    rig = Rig(moto_sqs, handler=Recorder(fail_on("x")), clock=FakeClock(), retry=retry)
    log = CallLog(moto_sqs)
    rig.send("x")
    rig.receive()
    rig.work()
    rig.flush()
    assert not log.of("ChangeMessageVisibilityBatch")
    assert not log.of("DeleteMessageBatch")
    assert rig.counters()["failed"] == 1
    assert rig.counters()["retried"] == 0


@pytest.mark.parametrize(("after", "expected"), [(7, 7), (0, 0), (2.6, 3)])
def test_retry_after_sets_that_delay(moto_sqs, after, expected):
    def behave(message: Message) -> None:
        raise Retry(after=after)

    rig = Rig(moto_sqs, handler=Recorder(behave), clock=FakeClock())
    log = CallLog(moto_sqs)
    rig.send("x")
    rig.receive()
    rig.work()
    rig.flush()
    assert timeouts_sent(log) == [expected]
    assert rig.depth() == ((1, 0) if expected == 0 else (0, 1))


class CustomBaseException(BaseException):
    pass


@pytest.mark.parametrize(
    "exc", [SystemExit(3), KeyboardInterrupt(), CustomBaseException("boom"), GeneratorExit()]
)
def test_base_exceptions_fail_the_message_and_the_worker_goes_on(moto_sqs, exc):
    def behave(message: Message) -> None:
        if message.body == "bad":
            raise exc

    handler = Recorder(behave)
    rig = Rig(moto_sqs, handler=handler, clock=FakeClock(), retry=RetrySettings(base=0))
    rig.send("bad", "good")
    assert rig.receive() == 2
    assert rig.work()  # did not raise
    assert rig.work()
    rig.flush()
    assert handler.bodies == ["bad", "good"]
    assert rig.counters()["failed"] == 1
    assert rig.counters()["deleted"] == 1
    assert rig.depth() == (1, 0)  # "bad" is visible again (base 0)


# -- async handlers -----------------------------------------------------------------------


@pytest.fixture
def bridge():
    """The async handlers' loop, on a thread the runtime's supervisor owns."""
    bridge = AsyncBridge()
    supervisor = ThreadSupervisor()
    stop = threading.Event()
    supervisor.spawn("async-handlers", bridge.run, stop)
    yield bridge
    stop.set()
    bridge.close()
    assert supervisor.stop_all(timeout_s=5) == []


def test_async_handler_runs_on_the_bridge_loop(moto_sqs, bridge):
    ran_on: list[tuple[str, bool]] = []

    async def handler(message: Message) -> None:
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        ran_on.append((threading.current_thread().name, loop is bridge.loop))

    rig = Rig(moto_sqs, handler=handler, is_async=True, clock=FakeClock(), bridge=bridge)
    rig.send("a", "b")
    rig.receive()
    assert rig.work_all() == 2
    rig.flush()
    assert ran_on == [("sqsb-async-handlers", True)] * 2
    assert rig.depth() == (0, 0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), ValueError("x")])
def test_async_handler_raising_fails_the_message_and_the_loop_survives(moto_sqs, bridge, exc):
    async def handler(message: Message) -> None:
        if message.body == "bad":
            raise exc

    rig = Rig(
        moto_sqs,
        handler=handler,
        is_async=True,
        clock=FakeClock(),
        bridge=bridge,
        retry=RetrySettings(base=0),
    )
    rig.send("bad", "good")
    rig.receive()
    assert rig.work_all() == 2
    rig.flush()
    assert rig.counters()["failed"] == 1
    assert rig.counters()["deleted"] == 1
    assert rig.depth() == (1, 0)
    assert bridge.loop.is_running()


# -- batch handlers -----------------------------------------------------------------------


def batch_rig(moto_sqs: Any, handler: Any, **kwargs: Any) -> Rig:
    return Rig(moto_sqs, handler=batch(handler), is_batch=True, clock=FakeClock(), **kwargs)


ANSWERS = {
    "BatchResult": lambda ms: BatchResult({ms[1].message_id}),
    "ids": lambda ms: [ms[1].message_id],
    "Messages": lambda ms: [ms[1]],
    "mixed": lambda ms: (x for x in [ms[1], ms[1].message_id]),
    "lambda": lambda ms: {"batchItemFailures": [{"itemIdentifier": ms[1].message_id}]},
}


@pytest.mark.parametrize("style", sorted(ANSWERS))
def test_batch_handler_partial_failure_deletes_only_the_successes(moto_sqs, style):
    received: list[list[Message]] = []

    def handler(messages: list[Message]) -> Any:
        received.append(messages)
        return ANSWERS[style](messages)

    rig = batch_rig(moto_sqs, handler)
    log = CallLog(moto_sqs)
    rig.send("a", "b", "c")
    assert rig.receive() == 3
    assert rig.work() and not rig.work()  # one call for the whole batch
    rig.flush()

    [messages] = received
    assert [m.body for m in messages] == ["a", "b", "c"]
    deleted = {e["ReceiptHandle"] for e in log.entries("DeleteMessageBatch")}
    assert deleted == {messages[0].receipt_handle, messages[2].receipt_handle}
    assert log.entries("ChangeMessageVisibilityBatch") == [
        {"Id": "0", "ReceiptHandle": messages[1].receipt_handle, "VisibilityTimeout": 5}
    ]
    assert rig.counters()["succeeded"] == 2
    assert rig.counters()["failed"] == 1


def _raising_generator(messages: list[Message]) -> Any:
    yield messages[0].message_id
    raise RuntimeError("broke while listing failures")


UNREADABLE = {
    "foreign id": lambda ms: ["not-an-id-of-this-batch"],
    "foreign BatchResult id": lambda ms: BatchResult({"nope"}),
    "empty itemIdentifier": lambda ms: {"batchItemFailures": [{"itemIdentifier": ""}]},
    "unknown itemIdentifier": lambda ms: {"batchItemFailures": [{"itemIdentifier": "x"}]},
    "mapping without batchItemFailures": lambda ms: {"failed": [ms[0].message_id]},
    "False": lambda ms: False,
    "True": lambda ms: True,
    "number": lambda ms: 0,
    "bare str": lambda ms: ms[0].message_id,
    "generator that raises": _raising_generator,
    "list of numbers": lambda ms: [1],
}


@pytest.mark.parametrize("style", sorted(UNREADABLE))
def test_an_unreadable_batch_answer_fails_the_whole_batch(moto_sqs, style, caplog):
    def handler(messages: list[Message]) -> Any:
        return UNREADABLE[style](messages)

    rig = batch_rig(moto_sqs, handler)
    log = CallLog(moto_sqs)
    rig.send("a", "b")
    assert rig.receive() == 2
    rig.work()
    rig.flush()
    assert not log.of("DeleteMessageBatch")  # nothing deleted on a guess
    assert rig.counters()["failed"] == 2
    assert rig.counters()["answer_unreadable"] == 1
    [line] = [r for r in caplog.records if "answer unreadable" in r.getMessage()]
    assert line.error  # names what came back


def test_batch_handler_raising_fails_the_whole_batch(moto_sqs):
    def handler(messages: list[Message]) -> None:
        raise RuntimeError("all of them")

    rig = batch_rig(moto_sqs, handler, retry=RetrySettings(base=0))
    rig.send("a", "b")
    rig.receive()
    rig.work()
    rig.flush()
    assert rig.counters()["failed"] == 2
    assert rig.depth() == (2, 0)


def test_fifo_batch_failure_retries_the_rest_of_its_group_in_process(moto_sqs):
    received: list[list[Message]] = []

    def handler(messages: list[Message]) -> Any:
        received.append(messages)
        if len(received) == 1:
            return [m for m in messages if m.body == "g1-b"]
        return None

    rig = batch_rig(moto_sqs, handler, name="work-a.fifo")
    log = CallLog(moto_sqs)
    rig.send("g1-a", "g1-b", "g1-c", group="g1")
    rig.send("g2-a", "g2-b", group="g2")
    assert rig.receive() == 5
    rig.work()
    rig.flush()

    body_of = {m.receipt_handle: m.body for m in received[0]}
    deleted = sorted(body_of[e["ReceiptHandle"]] for e in log.entries("DeleteMessageBatch"))
    assert deleted == ["g1-a", "g2-a", "g2-b"]  # g1-c must not be deleted ahead of g1-b
    assert not log.of("ChangeMessageVisibilityBatch")  # held, not handed back
    assert rig.counters()["failed"] == 1
    assert rig.counters()["held_back"] == 1  # g1-c: held, not a failure of its own

    assert not rig.work()  # the retry waits out its backoff (base 5)
    rig.clock.advance(5)
    assert rig.work()
    rig.flush()
    assert [(m.body, m.attempt, m.receive_count) for m in received[1]] == [
        ("g1-b", 2, 1),
        ("g1-c", 2, 1),
    ]
    assert rig.depth() == (0, 0)


# -- FIFO, one message at a time ----------------------------------------------------------


def test_fifo_failure_retries_in_process_and_holds_the_group(moto_sqs):
    attempts: dict[str, int] = {}

    def behave(message: Message) -> None:
        attempts[message.body] = attempts.get(message.body, 0) + 1
        if message.body == "g1-b" and attempts[message.body] == 1:
            raise ValueError("first attempt fails")

    handler = Recorder(behave)
    rig = Rig(moto_sqs, handler=handler, name="work-a.fifo", clock=FakeClock())
    log = CallLog(moto_sqs)
    rig.send("g1-a", "g1-b", "g1-c", group="g1")
    rig.send("g2-a", group="g2")
    assert rig.receive() == 4
    rig.work_all()
    # g1-c waits behind g1-b's backoff without running; g2 went on.
    assert handler.bodies == ["g1-a", "g1-b", "g2-a"]
    rig.clock.advance(5)
    rig.work_all()
    rig.flush()
    assert handler.bodies == ["g1-a", "g1-b", "g2-a", "g1-b", "g1-c"]
    assert [(m.attempt, m.receive_count) for m in handler.seen[3:]] == [(2, 1), (1, 1)]
    assert not log.of("ChangeMessageVisibilityBatch")  # nothing went back to SQS
    assert rig.counters()["failed"] == 1 and rig.counters()["retried"] == 1
    assert rig.depth() == (0, 0)


def test_a_fifo_retry_waiting_in_process_counts_its_bytes_as_held(moto_sqs):
    """The held-bytes budget counts a requeued retry's body: it is held again while it
    waits out its backoff (counted as 0 bytes, the budget let more in than it allows)."""

    def behave(message: Message) -> None:
        if message.body.startswith("b") and message.attempt == 1:
            raise ValueError("first attempt fails")

    rig = Rig(moto_sqs, handler=Recorder(behave), name="work-a.fifo", clock=FakeClock())
    rig.send("a" * 100, "b" * 300, "c" * 50, group="g1")
    assert rig.receive() == 3
    assert rig.dispatcher.held_bytes() == 450
    rig.work_all()  # a runs and is deleted; b fails and waits in process, c behind it
    assert rig.counters()["retried"] == 1
    assert rig.dispatcher.held_bytes() == 350
    rig.clock.advance(5)
    rig.work_all()
    rig.flush()
    assert rig.dispatcher.held_bytes() == 0
    assert rig.depth() == (0, 0)


def test_fifo_head_out_of_attempts_is_redriven_alone(moto_sqs):
    """maxReceiveCount 2: the head fails twice in process, then bounces (received one at a
    time, never run) until SQS moves it to the DLQ. Its group-mates gain one receive in all
    (the release that lets the head come back), so they run before any DLQ move."""
    dlq = moto_sqs.create_queue(QueueName="work-dlq.fifo", Attributes={"FifoQueue": "true"})
    dlq_arn = moto_sqs.get_queue_attributes(QueueUrl=dlq["QueueUrl"], AttributeNames=["QueueArn"])
    handler = Recorder(fail_on("g1-a"))
    rig = Rig(
        moto_sqs,
        handler=handler,
        name="work-a.fifo",
        clock=FakeClock(),
        retry=RetrySettings(base=0),
        max_receive_count=2,
    )
    moto_sqs.set_queue_attributes(
        QueueUrl=rig.url,
        Attributes={
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn["Attributes"]["QueueArn"], "maxReceiveCount": 2}
            )
        },
    )
    rig.send("g1-a", "g1-b", "g1-c", group="g1")
    rig.receive()
    rig.work_all()
    rig.flush()
    assert handler.bodies == ["g1-a", "g1-a"]  # two attempts in all
    for _ in range(6):
        rig.receive()
        rig.work_all()
        rig.flush()
    assert handler.bodies == ["g1-a", "g1-a", "g1-b", "g1-c"]
    assert [m.receive_count for m in handler.seen[2:]] == [2, 2]
    dead = moto_sqs.receive_message(QueueUrl=dlq["QueueUrl"], MaxNumberOfMessages=10)
    assert [m["Body"] for m in dead.get("Messages", [])] == ["g1-a"]


def test_tracing_wraps_each_handler_call_with_its_message():
    from contextlib import contextmanager

    from enginekit import make_item, make_queue
    from support import FakeClock

    from sqsbalancerd.engine.dispatch import Dispatcher
    from sqsbalancerd.engine.workers import Worker
    from sqsbalancerd.stats import Stats

    seen: list[tuple[str, str]] = []
    calls: list[str] = []

    @contextmanager
    def tracing(message):
        seen.append(("enter", message.message_id))
        yield
        seen.append(("exit", message.message_id))

    class Acks:
        def delete(self, deliveries):
            calls.extend(d.message.message_id for d in deliveries)

        def change_visibility(self, deliveries, timeout_s, *, reason):
            raise AssertionError("nothing fails here")

    clock = FakeClock()
    queue = make_queue("traced", invoke=lambda message: seen.append(("run", message.message_id)))
    dispatcher = Dispatcher(capacity=10, clock=clock)
    dispatcher.add_queue(queue)
    item = make_item(queue)
    dispatcher.reserve(queue, 1, timeout_s=0)
    dispatcher.submit(queue, [item])
    worker = Worker(dispatcher=dispatcher, acks=Acks(), stats=Stats(), clock=clock, tracing=tracing)
    assert worker.run_once(timeout_s=0)
    message_id = item.deliveries[0].message.message_id
    assert seen == [("enter", message_id), ("run", message_id), ("exit", message_id)]
    assert calls == [message_id]
