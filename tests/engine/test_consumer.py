"""The Engine: visibility extension up to max_extension, draining, owning and releasing queues.

Two ways to drive it: a recording spawner that starts no thread (the test calls each loop's
`run_once` itself, on a FakeClock, so time moves only when the handler moves it), and the
runtime's ThreadSupervisor on the real clock for the drain and ownership sequences.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from enginekit import CallLog, Faults, standalone_settings
from support import FakeClock, queue_depth, wait_until

from sqsbalancerd.clock import Clock, SystemClock
from sqsbalancerd.config import Settings
from sqsbalancerd.discovery import QueueInfo
from sqsbalancerd.engine.consumer import Engine, HandlerSet, build_policy
from sqsbalancerd.handler import ResolvedHandler
from sqsbalancerd.message import Message
from sqsbalancerd.observability.metrics import build_registry, render
from sqsbalancerd.runtime import ThreadSupervisor
from sqsbalancerd.stats import Stats


class _NotStarted:
    def is_alive(self) -> bool:
        return False

    def join(self, timeout: float | None = None) -> None:
        return None


class RecordingSpawner:
    """Records the loops the engine would start; the test runs them by hand."""

    def __init__(self) -> None:
        self.loops: dict[str, Callable[[threading.Event], None]] = {}

    def spawn(self, name: str, run: Callable[[threading.Event], None], stop: threading.Event):
        self.loops[name] = run
        return _NotStarted()

    def part(self, name: str) -> Any:
        return self.loops[name].__self__  # type: ignore[attr-defined]


def handlers_for(function: Callable[[Message], Any]) -> HandlerSet:
    resolved = ResolvedHandler(
        path="tests:handler", function=function, is_async=False, is_batch=False
    )
    return HandlerSet(default=resolved, by_path={})


def make_queue_info(sqs: Any, name: str, visibility_s: int = 30) -> QueueInfo:
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": str(visibility_s)})[
        "QueueUrl"
    ]
    return QueueInfo(name=name, url=url, visibility_timeout_s=visibility_s)


def build_engine(
    sqs: Any,
    settings: Settings,
    handler: Callable[[Message], Any],
    *,
    clock: Clock,
    spawner: Any,
    on_released: Callable[[str], None] | None = None,
    on_gone: Callable[[str], None] | None = None,
) -> Engine:
    return Engine(
        sqs=sqs,
        settings=settings,
        handlers=handlers_for(handler),
        stats=Stats(),
        clock=clock,
        spawner=spawner,
        on_released=on_released,
        on_gone=on_gone,
    )


def extension_timeouts(log: CallLog) -> dict[str, list[int]]:
    by_handle: dict[str, list[int]] = {}
    for entry in log.entries("ChangeMessageVisibilityBatch"):
        by_handle.setdefault(entry["ReceiptHandle"], []).append(entry["VisibilityTimeout"])
    return by_handle


def counters(engine: Engine, queue: str) -> dict[str, int]:
    snapshot = engine.snapshot("test")
    return next(asdict(q) for q in snapshot.queues if q.queue == queue)


# -- visibility extension (fake clock, no threads) ------------------------------------------


def test_running_and_queued_messages_are_extended_until_max_extension_then_dropped(moto_sqs):
    clock = FakeClock()
    spawner = RecordingSpawner()
    settings = standalone_settings(
        sqs={"visibility_timeout": 30, "max_extension": 60, "wait_time_seconds": 0},
        workers={"pool_size": 1, "queue_size": 5},
    )
    seen: list[str] = []
    stuck_while_running: list[int] = []

    def handler(message: Message) -> None:
        seen.append(message.body)
        for _ in range(70):  # the handler runs for 70 s of (fake) time
            clock.advance(1.0)
            engine.acks.run_once()
        stuck_while_running.append(engine.stuck_slots())

    engine = build_engine(moto_sqs, settings, handler, clock=clock, spawner=spawner)
    info = make_queue_info(moto_sqs, "work-a")
    engine.start()
    engine.set_owned([info])
    log = CallLog(moto_sqs)
    moto_sqs.send_message(QueueUrl=info.url, MessageBody="running")
    moto_sqs.send_message(QueueUrl=info.url, MessageBody="queued")
    spawner.part("poller:work-a").run_once()
    worker = spawner.part("worker-0")

    assert worker.run_once(timeout_s=0)
    engine.acks.flush_all()

    # Each extension pushes the deadline out, never past received + max_extension (60 s):
    # at t=20 to t=50 (30 s), at t=40 to t=60 (20 s); then nothing more, then expiry.
    timeouts = extension_timeouts(log)
    assert sorted(timeouts.values()) == [[30, 20], [30, 20]]
    assert stuck_while_running == [1]
    stats = counters(engine, "work-a")
    assert stats["expired"] == 2
    assert stats["succeeded"] == 0  # the late result was discarded...
    assert not log.of("DeleteMessageBatch")  # ...so nothing was deleted
    assert engine.stuck_slots() == 0
    # The queued one was dropped (it reappears by itself), not run.
    assert not worker.run_once(timeout_s=0)
    assert seen == ["running"]
    assert engine.dispatcher.depth() == 0
    engine.stop_receiving()
    engine.stop(timeout_s=0)


class FailExtensions:
    """Fails every ChangeMessageVisibilityBatch that extends (timeout > 0) in SQS's place,
    recording when (by `clock`); releases (timeout 0) go on to moto."""

    def __init__(self, client: Any, clock: Clock) -> None:
        self.failed_at: list[float] = []
        self._clock = clock
        client.meta.events.register("before-call.sqs.ChangeMessageVisibilityBatch", self._answer)

    def _answer(self, params: dict[str, Any], **_: Any) -> Any:
        entries = json.loads(params["body"])["Entries"]
        if not any(e["VisibilityTimeout"] > 0 for e in entries):
            return None
        self.failed_at.append(self._clock.monotonic())
        failed = [
            {"Id": e["Id"], "Code": "InternalError", "SenderFault": False, "Message": "simulated"}
            for e in entries
        ]
        return AWSResponse("https://sqs.simulated", 200, {}, None), {"Failed": failed}


def test_a_failed_extension_is_retried_early_and_an_unstarted_message_released_in_time(
    moto_sqs,
):
    """Extensions keep failing: each is retried sooner than the next check, and the queued
    (not started) message is dropped and released before its visibility runs out, not left
    to reappear while held (both copies would run)."""
    clock = FakeClock()
    spawner = RecordingSpawner()
    settings = standalone_settings(
        sqs={"visibility_timeout": 30, "wait_time_seconds": 0},
        workers={"pool_size": 1, "queue_size": 5},
    )
    seen: list[str] = []
    released_at: list[float] = []

    def handler(message: Message) -> None:
        seen.append(message.body)
        for _ in range(560):  # 28 s of fake time, with the acks loop running
            clock.advance(0.05)
            engine.acks.run_once()
            if not released_at and queue_depth(moto_sqs, info.url)[0]:
                released_at.append(clock.monotonic())

    engine = build_engine(moto_sqs, settings, handler, clock=clock, spawner=spawner)
    info = make_queue_info(moto_sqs, "work-a")
    engine.start()
    engine.set_owned([info])
    moto_sqs.send_message(QueueUrl=info.url, MessageBody="running")
    moto_sqs.send_message(QueueUrl=info.url, MessageBody="queued")
    spawner.part("poller:work-a").run_once()
    received_s = clock.monotonic()
    failing = FailExtensions(moto_sqs, clock)
    worker = spawner.part("worker-0")
    assert worker.run_once(timeout_s=0)

    assert len(failing.failed_at) >= 3
    first, second = failing.failed_at[:2]
    assert second - first < 0.5  # sooner than the next twice-a-second check
    assert released_at, "the unstarted message was never released"
    assert released_at[0] - received_s < 30 - 1  # with time to spare
    assert not worker.run_once(timeout_s=0)  # dropped: not run from this process
    assert seen == ["running"]
    engine.stop_receiving()
    engine.stop(timeout_s=0)


def test_a_fenced_engine_extends_nothing(moto_sqs):
    """Issue 11: extensions are fenced like receives. While receiving is paused (the budget
    ran out) a held message's visibility is left to run out, for its next owner."""
    clock = FakeClock()
    spawner = RecordingSpawner()
    settings = standalone_settings(
        sqs={"visibility_timeout": 30, "wait_time_seconds": 0},
        workers={"pool_size": 1, "queue_size": 5},
    )
    calls: list[str] = []
    engine = build_engine(moto_sqs, settings, lambda m: None, clock=clock, spawner=spawner)
    info = make_queue_info(moto_sqs, "work-a")
    engine.start()
    engine.set_owned([info])
    moto_sqs.send_message(QueueUrl=info.url, MessageBody="held")
    spawner.part("poller:work-a").run_once()
    moto_sqs.meta.events.register(
        "before-call.sqs.ChangeMessageVisibilityBatch", lambda **kw: calls.append("extend")
    )
    engine.pause_receiving()

    for _ in range(60):  # 30 s of fake time: past the extension lead, up to the timeout
        clock.advance(0.5)
        engine.acks.run_once()

    assert calls == []
    engine.resume_receiving()
    for _ in range(4):
        clock.advance(0.5)
        engine.acks.run_once()
    engine.stop_receiving()
    engine.stop(timeout_s=0)


def test_no_extension_after_the_delete_of_the_same_message(moto_sqs):
    clock = FakeClock()
    spawner = RecordingSpawner()
    settings = standalone_settings(
        sqs={"visibility_timeout": 30, "wait_time_seconds": 0},
        workers={"pool_size": 1, "queue_size": 5},
    )

    def handler(message: Message) -> None:
        for _ in range(int(message.body)):
            clock.advance(1.0)
            engine.acks.run_once()

    engine = build_engine(moto_sqs, settings, handler, clock=clock, spawner=spawner)
    info = make_queue_info(moto_sqs, "work-a")
    engine.start()
    engine.set_owned([info])
    log = CallLog(moto_sqs)
    moto_sqs.send_message(QueueUrl=info.url, MessageBody="25")  # A: returns at t=25
    moto_sqs.send_message(QueueUrl=info.url, MessageBody="30")  # B: runs t=25..55
    spawner.part("poller:work-a").run_once()
    worker = spawner.part("worker-0")
    assert worker.run_once(timeout_s=0)
    assert worker.run_once(timeout_s=0)
    engine.acks.flush_all()

    deletes = [i for i, (name, _) in enumerate(log.calls) if name == "DeleteMessageBatch"]
    assert len(deletes) == 2
    first_delete = deletes[0]
    [deleted] = log.calls[first_delete][1]["Entries"]
    later_changes = [
        e["ReceiptHandle"]
        for name, params in log.calls[first_delete:]
        if name == "ChangeMessageVisibilityBatch"
        for e in params["Entries"]
    ]
    assert later_changes, "B should have been extended after A's delete"
    assert deleted["ReceiptHandle"] not in later_changes
    earlier = extension_timeouts(log)
    assert earlier[deleted["ReceiptHandle"]] == [30]  # A was extended while it ran
    assert queue_depth(moto_sqs, info.url) == (0, 0)
    engine.stop_receiving()
    engine.stop(timeout_s=0)


def test_a_message_whose_delete_keeps_failing_is_still_extended_until_deleted(moto_sqs):
    """Simulated: DeleteMessageBatch fails the entry 4 times (then moto deletes it). The
    retries outlast the 6 s visibility; extension must keep the message invisible meanwhile
    (or it would be handled twice), and stop once the delete went through."""
    clock = FakeClock()
    spawner = RecordingSpawner()
    settings = standalone_settings(
        sqs={"visibility_timeout": 6, "wait_time_seconds": 0},
        workers={"pool_size": 1, "queue_size": 0},
    )

    def handler(message: Message) -> None:
        clock.advance(3.0)

    engine = build_engine(moto_sqs, settings, handler, clock=clock, spawner=spawner)
    info = make_queue_info(moto_sqs, "work-a", visibility_s=6)
    engine.start()
    engine.set_owned([info])
    moto_sqs.send_message(QueueUrl=info.url, MessageBody="x")
    spawner.part("poller:work-a").run_once()
    Faults(moto_sqs, "DeleteMessageBatch", [{0: "InternalError"}] * 4)
    log = CallLog(moto_sqs)
    assert spawner.part("worker-0").run_once(timeout_s=0)
    for _ in range(150):  # 15 s: the delete retries back off 0.4, 0.8, 1.6 and 3.2 s
        clock.advance(0.1)
        engine.acks.run_once()

    names = [name for name, _ in log.calls]
    assert names.count("DeleteMessageBatch") == 5
    last_delete = len(names) - 1 - names[::-1].index("DeleteMessageBatch")
    extensions = [i for i, name in enumerate(names) if name == "ChangeMessageVisibilityBatch"]
    assert extensions, "not extended while its delete was being retried"
    assert max(extensions) < last_delete, "extended after the delete went through"
    assert queue_depth(moto_sqs, info.url) == (0, 0)
    assert counters(engine, "work-a")["deleted"] == 1
    engine.stop_receiving()
    engine.stop(timeout_s=0)


def test_build_policy_applies_the_first_matching_override():
    settings = standalone_settings(
        sqs={"wait_time_seconds": 3, "max_messages": 7},
        retry={"base": 2, "max": 100},
        queue=[
            {
                "match": "^work-a$",
                "max_concurrency": 2,
                "max_rate": 5,
                "visibility_timeout": 60,
                "retry": {"base": 1, "max": 10},
                "wait_time_seconds": 0,
            },
            {"match": "^work-", "max_messages": 3},
        ],
    )
    a = build_policy(settings, QueueInfo("work-a", "u", visibility_timeout_s=30))
    assert (a.max_concurrency, a.max_rate_per_s, a.visibility_timeout_s) == (2, 5.0, 60)
    assert a.is_visibility_configured
    assert a.wait_time_s == 0
    assert a.max_messages == 7
    assert a.retry.delay_s(3) == 4.0
    b = build_policy(settings, QueueInfo("work-b", "u", visibility_timeout_s=45))
    assert (b.max_concurrency, b.max_rate_per_s) == (None, None)
    assert (b.visibility_timeout_s, b.is_visibility_configured) == (45, False)
    assert (b.wait_time_s, b.max_messages) == (3, 3)
    assert b.retry.delay_s(3) == 8.0


# -- threads on the real clock -------------------------------------------------------------


class Gate:
    """A handler that blocks its first message until `release`, records everything.

    An assertion here would only fail the handler (the engine counts a failure and goes on):
    problems go to `failures`, which the `threaded` fixture asserts empty after the test."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.seen: list[str] = []
        self.returned: list[str] = []
        self.failures: list[str] = []

    def __call__(self, message: Message) -> None:
        self.seen.append(message.body)
        if not self.started.is_set():
            self.started.set()
            if not self.release.wait(30):
                self.failures.append(f"{message.body}: the test never released the handler")
        self.returned.append(message.body)


@pytest.fixture
def threaded(moto_sqs: Any) -> Iterator[Callable[..., tuple[Engine, ThreadSupervisor]]]:
    built: list[tuple[Engine, ThreadSupervisor]] = []
    gates: list[Gate] = []

    def build(handler: Callable[[Message], Any], **kwargs: Any) -> tuple[Engine, ThreadSupervisor]:
        if isinstance(handler, Gate):
            gates.append(handler)
        settings = standalone_settings(
            sqs={"wait_time_seconds": 1},
            workers={"pool_size": 1, "queue_size": 5},
        )
        supervisor = ThreadSupervisor()
        engine = build_engine(
            moto_sqs, settings, handler, clock=SystemClock(), spawner=supervisor, **kwargs
        )
        engine.start()
        built.append((engine, supervisor))
        return engine, supervisor

    yield build
    for engine, supervisor in built:
        engine.stop_receiving()
        engine.stop(timeout_s=5)
        assert supervisor.stop_all(timeout_s=5) == []
    for gate in gates:
        assert not gate.failures, gate.failures


def deadline(seconds: float) -> float:
    return time.monotonic() + seconds


def test_drain_releases_unstarted_at_once_and_lets_the_running_one_finish(moto_sqs, threaded):
    handler = Gate()
    engine, supervisor = threaded(handler)
    info = make_queue_info(moto_sqs, "work-a")
    for body in ("a", "b", "c", "d"):
        moto_sqs.send_message(QueueUrl=info.url, MessageBody=body)
    engine.set_owned([info])
    assert handler.started.wait(10)
    wait_until(lambda: engine.dispatcher.depth() == 3, timeout_s=10, what="3 queued")

    assert engine.stop_receiving() == 3
    wait_until(
        lambda: queue_depth(moto_sqs, info.url) == (3, 1),
        timeout_s=5,
        what="unstarted messages visible again while the handler still runs",
    )
    assert not handler.returned

    handler.release.set()
    assert engine.wait_pollers(deadline(10))
    assert engine.wait_handlers(deadline(10))
    engine.stop(timeout_s=5)
    assert queue_depth(moto_sqs, info.url) == (3, 0)
    assert handler.seen == handler.returned == [handler.seen[0]]
    stats = counters(engine, "work-a")
    assert stats["deleted"] == 1
    # 3, or more when a poll in flight at the stop got some of them again and let them go.
    assert stats["released"] >= 3
    assert supervisor.stop_all(timeout_s=5) == []


def test_abandoned_handler_result_is_discarded(moto_sqs, threaded):
    handler = Gate()
    engine, _ = threaded(handler)
    info = make_queue_info(moto_sqs, "work-a")
    log = CallLog(moto_sqs)
    moto_sqs.send_message(QueueUrl=info.url, MessageBody="slow")
    engine.set_owned([info])
    assert handler.started.wait(10)

    engine.stop_receiving()
    assert not engine.wait_handlers(deadline(0.2))
    assert engine.abandon_running() == 1
    handler.release.set()
    wait_until(lambda: handler.returned, timeout_s=5, what="the handler to return")
    engine.stop(timeout_s=5)
    assert not log.of("DeleteMessageBatch")
    assert queue_depth(moto_sqs, info.url) == (1, 0)  # released at once, not left to expire


def test_a_removed_queue_is_released_once_its_work_is_done(moto_sqs, threaded):
    released: list[str] = []
    handler = Gate()
    engine, _ = threaded(handler, on_released=released.append)
    a = make_queue_info(moto_sqs, "work-a")
    b = make_queue_info(moto_sqs, "work-b")
    moto_sqs.send_message(QueueUrl=a.url, MessageBody="a1")
    engine.set_owned([a, b])
    assert handler.started.wait(10)

    engine.set_owned([b])
    assert engine.owned() == ("work-b",)
    moto_sqs.send_message(QueueUrl=a.url, MessageBody="a2")  # must not be received now
    assert released == []  # a1 is still running
    handler.release.set()
    wait_until(lambda: released == ["work-a"], timeout_s=10, what="work-a released")
    assert handler.seen == ["a1"]
    assert queue_depth(moto_sqs, a.url) == (1, 0)

    engine.set_owned([a, b])  # owned again: consumed again
    wait_until(lambda: "a2" in handler.returned, timeout_s=10, what="a2 handled")
    assert engine.owned() == ("work-a", "work-b")


def test_a_queue_deleted_while_owned_stops_with_one_warning(moto_sqs, threaded, caplog):
    caplog.set_level(logging.WARNING, logger="sqsbalancerd")
    released: list[str] = []
    said: list[str] = []  # gone, then released: the coordinator forgets it before the release
    engine, _ = threaded(
        lambda message: None,
        on_released=lambda name: (released.append(name), said.append(f"released {name}")),
        on_gone=lambda name: said.append(f"gone {name}"),
    )
    a = make_queue_info(moto_sqs, "work-a")
    b = make_queue_info(moto_sqs, "work-b")
    engine.set_owned([a, b])
    moto_sqs.delete_queue(QueueUrl=a.url)

    wait_until(lambda: released == ["work-a"], timeout_s=15, what="work-a released")
    assert engine.owned() == ("work-b",)
    assert said[0] == "gone work-a" and said[-1] == "released work-a"  # extra pollers: 1+ gone
    gone = [r for r in caplog.records if "no longer exists" in r.getMessage()]
    assert len(gone) == 1
    moto_sqs.send_message(QueueUrl=b.url, MessageBody="still consumed")
    wait_until(
        lambda: queue_depth(moto_sqs, b.url) == (0, 0), timeout_s=10, what="work-b still consumed"
    )


def test_a_queue_owned_again_while_draining_is_consumed_again_not_released(moto_sqs, threaded):
    released: list[str] = []
    handler = Gate()
    engine, _ = threaded(handler, on_released=released.append)
    a = make_queue_info(moto_sqs, "work-a")
    moto_sqs.send_message(QueueUrl=a.url, MessageBody="a1")
    engine.set_owned([a])
    assert handler.started.wait(10)

    engine.set_owned([])
    moto_sqs.send_message(QueueUrl=a.url, MessageBody="a2")
    engine.set_owned([a])  # back before a1 finished: the drain must not end in a release
    handler.release.set()
    wait_until(lambda: "a2" in handler.returned, timeout_s=15, what="a2 handled")
    assert released == []
    assert engine.owned() == ("work-a",)


def test_a_released_queue_leaves_no_per_queue_stats_or_metric_labels(moto_sqs, threaded):
    """Queues come and go by the thousand: a released queue's counters, histograms and
    so its metric label sets go with it; the process totals keep its counts."""
    released: list[str] = []
    engine, _ = threaded(lambda message: None, on_released=released.append)
    a = make_queue_info(moto_sqs, "work-a")
    b = make_queue_info(moto_sqs, "work-b")
    moto_sqs.send_message(QueueUrl=a.url, MessageBody="a1")
    engine.set_owned([a, b])
    wait_until(lambda: queue_depth(moto_sqs, a.url) == (0, 0), timeout_s=10, what="a1 deleted")
    wait_until(lambda: counters(engine, "work-a")["deleted"] == 1, timeout_s=5)

    engine.set_owned([b])
    wait_until(lambda: released == ["work-a"], timeout_s=10, what="work-a released")
    snapshot = engine.snapshot("test")
    assert [q.queue for q in snapshot.queues] == ["work-b"]
    assert "work-a" not in snapshot.handler_duration and "work-a" not in snapshot.message_age
    text = render(build_registry(lambda: snapshot, None)).decode()
    assert 'queue="work-a"' not in text and 'queue="work-b"' in text
    assert snapshot.totals()["deleted"] == 1 and snapshot.totals()["received"] == 1


def test_deletes_of_concurrent_finishes_share_batches_and_still_go_out_within_the_linger(
    moto_sqs,
):
    """Ten workers, four queues, 50 ms handlers: the ten messages of a receive run side by
    side and finish together, so their deletes fill one DeleteMessageBatch (one message per
    queue in turn averaged 1.8 deletes per batch), each still sent within the 0.1 s linger."""
    settings = standalone_settings(
        sqs={"wait_time_seconds": 1}, workers={"pool_size": 10, "queue_size": 100}
    )
    returned: dict[str, float] = {}

    def handler(message: Message) -> None:
        time.sleep(0.05)  # the handler's work, not a synchronisation
        returned[message.receipt_handle] = time.monotonic()

    sent_at: dict[str, float] = {}
    batches: list[int] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        batches.append(len(params["Entries"]))
        for entry in params["Entries"]:
            sent_at[entry["ReceiptHandle"]] = time.monotonic()

    moto_sqs.meta.events.register("before-parameter-build.sqs.DeleteMessageBatch", record)
    infos = [make_queue_info(moto_sqs, f"work-{n}") for n in range(4)]
    for info in infos:
        entries = [{"Id": str(i), "MessageBody": "{}"} for i in range(10)]
        for _ in range(2):
            moto_sqs.send_message_batch(QueueUrl=info.url, Entries=entries)
    supervisor = ThreadSupervisor()
    engine = build_engine(moto_sqs, settings, handler, clock=SystemClock(), spawner=supervisor)
    engine.start()
    try:
        engine.set_owned(infos)
        wait_until(lambda: sum(batches) == 80, timeout_s=30, what="80 messages deleted")
    finally:
        engine.stop_receiving()
        engine.stop(timeout_s=5)
        assert supervisor.stop_all(timeout_s=5) == []
    assert sum(batches) / len(batches) >= 8, batches
    assert set(sent_at) == set(returned)
    delays = sorted(sent_at[receipt] - returned[receipt] for receipt in returned)
    assert delays[-1] < 0.5, delays[-5:]  # the linger is 0.1 s: this is its loaded-machine bound
