"""The poller against moto: it receives only what it has room for, and gives back the rest."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from botocore.exceptions import EndpointConnectionError, ReadTimeoutError
from enginekit import CallLog, Rig, Throttle, standalone_settings
from support import FakeClock, wait_until

from sqsbalancerd.app import ack_options
from sqsbalancerd.aws import sqs_client
from sqsbalancerd.clock import SystemClock
from sqsbalancerd.engine.acks import MAX_PENDING_PER_QUEUE as MAX_PENDING_ACKS
from sqsbalancerd.engine.acks import MAX_PENDING_TOTAL as MAX_PENDING_ACKS_TOTAL
from sqsbalancerd.engine.acks import Acknowledger
from sqsbalancerd.stats import Stats


def test_asks_for_no_more_than_the_room_it_reserved(moto_sqs):
    rig = Rig(moto_sqs, capacity=3, clock=SystemClock())
    log = CallLog(moto_sqs)
    rig.send(*[f"m{n}" for n in range(5)])

    assert rig.receive() == 3
    assert log.of("ReceiveMessage")[0]["MaxNumberOfMessages"] == 3
    # Full: the next round waits for room (bounded) and does not receive at all.
    assert rig.receive() == 0
    assert len(log.of("ReceiveMessage")) == 1
    assert rig.depth() == (2, 3)


def test_returns_the_unused_part_of_its_reservation(moto_sqs):
    rig = Rig(moto_sqs, capacity=10, clock=FakeClock())
    rig.send("only")
    assert rig.receive() == 1
    assert rig.dispatcher.reserve(rig.queue, 100, timeout_s=0) == 9


def test_receive_parameters(moto_sqs):
    rig = Rig(moto_sqs, clock=FakeClock(), wait_time_s=7, max_messages=4)
    log = CallLog(moto_sqs)
    rig.send("x")
    rig.receive()
    [params] = log.of("ReceiveMessage")
    assert params["WaitTimeSeconds"] == 7
    assert params["MaxNumberOfMessages"] == 4
    assert params["MessageSystemAttributeNames"] == ["All"]
    assert params["MessageAttributeNames"] == ["All"]
    # Always sent, so the timeout the engine counts with is the one SQS applies.
    assert params["VisibilityTimeout"] == 30
    assert "ReceiveRequestAttemptId" not in params


def test_a_receive_after_a_full_one_waits_one_second_at_most(moto_sqs):
    """It claims room from the global bound until it returns (see Dispatcher.reserve): a
    long poll of a queue just run dry held that room for 20 s, and a hundred small queues
    running dry together held all of it while the big ones waited (Zipf: 30 msgs/s). It is
    still a long poll (every SQS server is asked, so a short answer means the queue ran
    dry), of one second."""
    rig = Rig(moto_sqs, clock=SystemClock(), wait_time_s=5, max_messages=3)
    log = CallLog(moto_sqs)
    rig.send("a", "b", "c")
    assert rig.receive() == 3  # idle until now: a long poll; full
    rig.work_all()

    started = time.monotonic()
    assert rig.receive() == 0  # the queue ran dry: this one comes back within a second
    assert time.monotonic() - started < 3
    assert [c["WaitTimeSeconds"] for c in log.of("ReceiveMessage")] == [5, 1]
    assert rig.dispatcher.reserve(rig.queue, 100, timeout_s=0) == 20  # its room came back


def test_a_short_answer_is_not_confirmed_by_an_empty_receive(moto_sqs):
    """Fewer messages than asked for from a long poll: the queue ran dry. The next receive
    is the idle long poll, not a quick empty one first (in the Zipf bench that was one
    receive more per queue and drain: 0.35-0.40 SQS calls a message against 0.23)."""
    rig = Rig(moto_sqs, clock=SystemClock(), wait_time_s=2)
    log = CallLog(moto_sqs)
    rig.send(*[f"m{n}" for n in range(13)])
    assert rig.receive() == 10  # idle long poll, full
    rig.work_all()
    assert rig.receive() == 3  # busy: a one-second long poll, short
    rig.work_all()
    assert rig.receive() == 0  # idle again: the full wait, not a confirming quick one
    assert [c["WaitTimeSeconds"] for c in log.of("ReceiveMessage")] == [2, 1, 2]
    assert rig.queue.held == 0


def test_a_short_answer_on_a_fifo_queue_keeps_it_busy(moto_sqs):
    """On FIFO a short answer says nothing of the rest: groups with a message in flight
    are held back by SQS. Only an empty answer makes the poller idle."""
    rig = Rig(moto_sqs, name="work-a.fifo", clock=SystemClock(), wait_time_s=2)
    log = CallLog(moto_sqs)
    rig.send("a", "b", group="g1")
    assert rig.receive() == 2  # short, but it is FIFO
    rig.work_all()
    assert rig.receive() == 0
    assert rig.receive() == 0
    assert [c["WaitTimeSeconds"] for c in log.of("ReceiveMessage")] == [2, 1, 2]


def test_a_lowered_queue_timeout_does_not_let_held_messages_reappear(moto_sqs):
    """Discovery saw 30 s; someone lowers the queue's default to 1 s: receives still hide
    messages for the 30 s the engine counts with."""
    clock = FakeClock()
    rig = Rig(moto_sqs, clock=clock, visibility_timeout_s=30)
    moto_sqs.set_queue_attributes(QueueUrl=rig.url, Attributes={"VisibilityTimeout": "1"})
    rig.send("x")
    assert rig.receive() == 1
    time.sleep(1.2)  # real time: moto's own clock decides visibility
    assert rig.depth() == (0, 1)


def test_a_receive_that_cannot_be_queued_gives_its_room_and_messages_back(moto_sqs, monkeypatch):
    rig = Rig(moto_sqs, clock=FakeClock())
    rig.send("a", "b")

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("malformed message")

    monkeypatch.setattr("sqsbalancerd.engine.poller.message_from_sqs", broken)
    assert rig.poller.run_once() == 0.0
    assert rig.queue.held == 0  # the room is not lost: the queue can receive again
    assert rig.depth() == (2, 0)  # released at once, not left invisible


def test_no_long_poll_starts_after_the_signal_that_came_during_the_renewal_wait(moto_sqs):
    rig = Rig(moto_sqs, clock=FakeClock())
    log = CallLog(moto_sqs)
    rig.send("a")

    def budget_during_signal() -> float:
        rig.dispatcher.stop_receiving()  # SIGTERM while the gate waited for a renewal
        return 100.0

    rig.gate.set_budget(budget_during_signal)
    rig.poller.run_once()
    assert not log.of("ReceiveMessage")
    assert rig.queue.held == 0


def test_configured_visibility_and_fifo_attempt_id_are_sent(moto_sqs):
    rig = Rig(
        moto_sqs,
        name="work-a.fifo",
        clock=FakeClock(),
        visibility_timeout_s=45,
        is_visibility_configured=True,
    )
    log = CallLog(moto_sqs)
    rig.send("x", group="g")
    assert rig.receive() == 1
    [params] = log.of("ReceiveMessage")
    assert params["VisibilityTimeout"] == 45
    assert params["ReceiveRequestAttemptId"]
    [item] = rig.queue.queued
    assert item.groups == frozenset({"g"})
    assert item.deliveries[0].message.group_id == "g"


def test_messages_a_poll_returns_after_receiving_stopped_are_released_at_once(moto_sqs):
    """SIGTERM arrives while the long poll is in flight (simulated by a hook on the call)."""
    rig = Rig(moto_sqs, clock=FakeClock())
    rig.send("a", "b", "c")

    def signal_arrives(**_: object) -> None:
        rig.dispatcher.stop_receiving()

    moto_sqs.meta.events.register("before-call.sqs.ReceiveMessage", signal_arrives)

    assert rig.receive() == 0  # received 3, queued none
    assert rig.acks.pending_total() == 3
    rig.acks.run_once()  # releases are due at once, no linger
    assert rig.depth() == (3, 0)
    assert rig.counters()["received"] == 3
    assert rig.counters()["released"] == 3
    assert not rig.work()
    assert rig.dispatcher.is_queue_idle(rig.queue)


def test_no_receive_once_receiving_stopped(moto_sqs):
    rig = Rig(moto_sqs, clock=FakeClock())
    log = CallLog(moto_sqs)
    rig.send("a")
    rig.dispatcher.stop_receiving()
    stop = threading.Event()
    rig.poller.run(stop)  # returns at once instead of polling
    assert not log.of("ReceiveMessage")


def test_a_deleted_queue_stops_its_poller_with_one_warning(moto_sqs, caplog):
    rig = Rig(moto_sqs, clock=FakeClock())
    moto_sqs.delete_queue(QueueUrl=rig.url)
    caplog.set_level(logging.WARNING, logger="sqsbalancerd")

    rig.poller.run(threading.Event())  # returns by itself

    assert rig.gone == [rig.queue]
    assert rig.queue.is_gone
    warnings = [r for r in caplog.records if "no longer exists" in r.getMessage()]
    assert len(warnings) == 1
    assert rig.dispatcher.reserve(rig.queue, 100, timeout_s=0) == 20  # nothing leaked


def test_a_failing_receive_backs_off_and_returns_its_reservation(moto_sqs, caplog):
    rig = Rig(moto_sqs, clock=FakeClock(), capacity=10)

    def fail(**_: object) -> None:
        raise EndpointConnectionError(endpoint_url="https://sqs.simulated")

    moto_sqs.meta.events.register("before-call.sqs.ReceiveMessage", fail)
    assert rig.poller.run_once() == 1.0
    assert rig.poller.run_once() == 2.0
    assert rig.dispatcher.reserve(rig.queue, 100, timeout_s=0) == 10
    rig.dispatcher.unreserve(rig.queue, 10)
    moto_sqs.meta.events.unregister("before-call.sqs.ReceiveMessage", fail)
    rig.send("x")
    assert rig.poller.run_once() == 0.0  # success resets the backoff
    assert rig.dispatcher.depth() == 1


def test_paused_gate_means_no_receive(moto_sqs):
    rig = Rig(moto_sqs, clock=FakeClock())
    log = CallLog(moto_sqs)
    rig.send("x")
    rig.gate.pause()
    assert rig.poller.run_once() == 0.0
    assert not log.of("ReceiveMessage")
    rig.gate.resume()
    assert rig.receive() == 1


def test_receive_budget_bounds_the_long_poll(moto_sqs, monkeypatch):
    import threading

    from sqsbalancerd.engine import poller

    monkeypatch.setattr(poller, "FENCED_WAIT_S", 5.0)
    rig = Rig(moto_sqs, clock=FakeClock(), wait_time_s=20)
    log = CallLog(moto_sqs)
    rig.send("x")
    budget: list[float | None] = [5.0]
    rig.gate.set_budget(lambda: budget[0])
    assert rig.receive() == 1
    assert log.of("ReceiveMessage")[0]["WaitTimeSeconds"] == 4  # one second of slack

    budget[0] = 0.5  # too little left to start a receive: wait for the renewal, not spin
    threading.Timer(0.2, rig.gate.notify_renewed).start()
    started = time.monotonic()
    assert rig.poller.run_once() == 0.0
    assert 0.1 < time.monotonic() - started < 4.0  # woken by the renewal, not the timeout
    assert len(log.of("ReceiveMessage")) == 1
    assert rig.dispatcher.reserve(rig.queue, 100, timeout_s=0) == 19


def test_gate_waits_for_an_imminent_renewal_instead_of_cutting_the_poll():
    import threading

    from sqsbalancerd.engine.poller import ReceiveGate

    gate = ReceiveGate()
    budget = {"s": 12.0}
    gate.set_budget(lambda: budget["s"], lambda: 0.5)

    def renew() -> None:
        budget["s"] = 20.0 + 1.0
        gate.notify_renewed()

    timer = threading.Timer(0.2, renew)
    timer.start()
    try:
        assert gate.wait_time_s(20) == 20  # waited for the renewal: a full poll
    finally:
        timer.join(timeout=5)

    # A renewal far away: no waiting, the poll is cut to the budget.
    gate.set_budget(lambda: 12.0, lambda: 8.0)
    assert gate.wait_time_s(20) == 11
    # No budget at all (standalone): the wanted wait.
    gate.set_budget(lambda: None)
    assert gate.wait_time_s(20) == 20


def test_a_busy_queue_does_not_wait_for_a_renewal_an_idle_one_does(moto_sqs):
    """The renewal wait is for idle polls only: while receives return messages, a short
    budget just shortens WaitTimeSeconds (the receive returns at once anyway). Waiting
    there stalled every dynamodb-mode poller before each renewal (40 msgs/s in the bench
    at 1 s heartbeats instead of ~1,200)."""
    rig = Rig(moto_sqs, clock=FakeClock(), wait_time_s=20, max_messages=1)
    log = CallLog(moto_sqs)
    renewal_waits: list[float] = []
    rig.gate.set_budget(lambda: 3.0, lambda: 0.5)  # short budget, renewal in half a second
    rig.gate._after_imminent_renewal = lambda budget: (  # type: ignore[method-assign]
        renewal_waits.append(budget) or budget
    )
    rig.send("a", "b")

    assert rig.receive() == 1  # the first poll: nothing seen yet, idle, so it waited
    assert renewal_waits == [3.0]
    assert rig.receive() == 1  # the last one returned a message: no wait
    assert renewal_waits == [3.0]
    # The first cut to the budget; the busy one long-polls for one second only.
    assert [c["WaitTimeSeconds"] for c in log.of("ReceiveMessage")] == [2, 1]
    assert rig.receive() == 0  # busy still (the last receive had a message): no wait
    assert renewal_waits == [3.0]
    assert rig.receive() == 0  # that one came back empty: idle again, it waits
    assert renewal_waits == [3.0, 3.0]


# -- backpressure from the acknowledger -------------------------------------------------


def test_no_receive_while_this_queues_acks_are_backed_up(moto_sqs):
    clock = FakeClock()  # standing still: the deletes linger until the test flushes them
    rig = Rig(moto_sqs, clock=clock, capacity=40)
    log = CallLog(moto_sqs)
    rig.send(*[f"m{n}" for n in range(40)])
    assert rig.receive() == 10
    assert rig.work_all() == 10
    assert rig.receive() == 10
    for _ in range(MAX_PENDING_ACKS - 1 - 10):
        assert rig.work()
    assert rig.acks.pending_for(rig.url) == MAX_PENDING_ACKS - 1
    assert rig.receive() == 10  # one short of the limit: still receiving

    assert rig.work()
    assert rig.acks.pending_for(rig.url) == MAX_PENDING_ACKS
    receives = len(log.of("ReceiveMessage"))
    for _ in range(2):
        assert rig.poller.run_once() == 0.0  # waits for the acks instead (up to 0.5 s)
    assert len(log.of("ReceiveMessage")) == receives
    assert rig.depth() == (10, 30)  # not for want of messages
    assert rig.dispatcher.depth() == 10  # and nothing reserved for a receive

    clock.advance(0.1)
    assert rig.acks.run_once() == MAX_PENDING_ACKS  # drained
    assert rig.receive() == 10
    assert len(log.of("ReceiveMessage")) == receives + 1


def test_no_receive_while_all_queues_acks_add_up_to_the_total_limit(moto_sqs):
    """One thread sends every queue's acks: others' backlog holds up an idle queue too."""
    clock = FakeClock()
    stats = Stats()
    acks = Acknowledger(moto_sqs, stats=stats, clock=clock)
    rig = Rig(moto_sqs, name="work-idle", clock=clock, acks=acks, stats=stats)
    per_queue = 10  # each below MAX_PENDING_ACKS
    others = [
        Rig(moto_sqs, name=f"work-busy-{n}", clock=clock, acks=acks, stats=stats)
        for n in range(MAX_PENDING_ACKS_TOTAL // per_queue)
    ]
    for other in others:
        other.send(*[f"m{n}" for n in range(per_queue)])
        assert other.receive() == per_queue
    for other in others[:-1]:
        assert other.work_all() == per_queue
    for _ in range(per_queue - 1):
        assert others[-1].work()
    assert acks.pending_total() == MAX_PENDING_ACKS_TOTAL - 1
    rig.send(*[f"i{n}" for n in range(20)])
    log = CallLog(moto_sqs)
    assert rig.receive() == 10  # one short of the limit

    assert others[-1].work()
    assert acks.pending_total() == MAX_PENDING_ACKS_TOTAL
    assert acks.pending_for(rig.url) == 0
    assert rig.poller.run_once() == 0.0  # held back: no receive
    assert len(log.of("ReceiveMessage")) == 1

    clock.advance(0.1)
    assert acks.run_once() == MAX_PENDING_ACKS_TOTAL
    assert rig.receive() == 10
    assert len(log.of("ReceiveMessage")) == 2


class ReceiveLog:
    """ReceiveMessage calls a client started and finished (all threads)."""

    def __init__(self, client: Any) -> None:
        self._lock = threading.Lock()
        self.started = 0
        self.ended = 0
        client.meta.events.register("before-call.sqs.ReceiveMessage", self._start)
        client.meta.events.register("after-call.sqs.ReceiveMessage", self._end)

    def _start(self, **_: Any) -> None:
        with self._lock:
            self.started += 1

    def _end(self, **_: Any) -> None:
        with self._lock:
            self.ended += 1

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.started, self.ended


def test_a_running_poller_stops_receiving_while_deletes_are_throttled_and_resumes(moto_sqs):
    """Poller, worker and acks loops on their own threads; the daemon's acks client with
    every delete throttled. Waits are bounded polls or the throttle's own counter."""
    clock = SystemClock()
    client = sqs_client(ack_options(standalone_settings()))
    stats = Stats()
    acks = Acknowledger(client, stats=stats, clock=clock)
    rig = Rig(moto_sqs, clock=clock, acks=acks, stats=stats, capacity=20, wait_time_s=1)
    throttle = Throttle(client, "DeleteMessageBatch", [rig.url])
    receives = ReceiveLog(moto_sqs)
    total = 60
    rig.send(*[f"m{n}" for n in range(total)])
    stop = threading.Event()
    threads = [
        threading.Thread(target=loop, args=(stop,), name=f"test-{name}", daemon=True)
        for name, loop in (
            ("acks", acks.run),
            ("worker", rig.worker.run),
            ("poller", rig.poller.run),
        )
    ]
    for thread in threads:
        thread.start()
    try:
        # Backed up: enough deletes pending, everything received handled, no receive running.
        def backed_up() -> bool:
            started, ended = receives.counts()
            return (
                acks.pending_for(rig.url) >= MAX_PENDING_ACKS
                and rig.dispatcher.is_queue_idle(rig.queue)
                and started == ended
            )

        wait_until(backed_up, timeout_s=10, what="the deletes to back up")
        # A poller round begun after that saw the backlog; any round before it is over.
        since = clock.monotonic()
        wait_until(lambda: rig.poller.last_tick_s > since, timeout_s=5, what="a poller round")
        started, _ = receives.counts()
        pending = acks.pending_for(rig.url)
        # Bounded: at most one dispatcher's worth past the limit.
        assert pending < MAX_PENDING_ACKS + 20
        # The acks thread retries twice more, the poller goes round again: still no receive.
        attempts = throttle.attempts[rig.url]
        throttle.wait_for(rig.url, attempts + 2)
        since = clock.monotonic()
        wait_until(lambda: rig.poller.last_tick_s > since, timeout_s=5, what="a poller round")
        assert receives.counts()[0] == started
        assert rig.depth()[0] == total - pending  # the rest wait in SQS, visible
        assert acks.pending_for(rig.url) == pending  # retried, none given up

        throttle.stop()
        wait_until(lambda: receives.counts()[0] > started, timeout_s=10, what="receiving to resume")
        wait_until(
            lambda: rig.counters().get("deleted") == total,
            timeout_s=20,
            what="every message deleted",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    assert rig.depth() == (0, 0)
    assert rig.counters()["delete_failed"] == 0
    assert rig.counters()["ack_retried"] == throttle.entries[rig.url]


def test_a_message_received_again_while_held_is_not_run_twice(moto_sqs):
    rig = Rig(moto_sqs, clock=FakeClock(), visibility_timeout_s=1)
    log = CallLog(moto_sqs)
    rig.send("x")
    assert rig.receive() == 1
    [held] = rig.dispatcher.held_deliveries()
    first_receipt = held.message.receipt_handle
    time.sleep(1.2)  # moto's clock: the visibility ran out while it waited in our queue
    assert rig.receive() == 0  # merged into the held copy, not queued twice
    assert rig.counters()["duplicates"] == 1
    assert held.message.receipt_handle != first_receipt  # the newest receipt is kept
    assert held.message.receive_count == 2
    assert rig.work() and not rig.work()
    rig.clock.advance(0.1)
    rig.flush()
    assert [e["ReceiptHandle"] for e in log.entries("DeleteMessageBatch")] == [
        held.message.receipt_handle
    ]


def test_a_message_received_again_before_its_delete_went_out_is_deleted_not_rerun(moto_sqs):
    handled: list[str] = []
    rig = Rig(
        moto_sqs,
        handler=lambda m: handled.append(m.body),
        clock=FakeClock(),
        visibility_timeout_s=1,
    )
    log = CallLog(moto_sqs)
    [message_id] = rig.send("x")
    rig.receive()
    delivery = rig.queue.by_message_id[message_id]
    first_receipt = delivery.message.receipt_handle
    assert rig.work()  # handled; its delete lingers (the fake clock stands still)
    time.sleep(1.2)
    assert rig.receive() == 0  # the redelivery only renews the pending delete's receipt
    assert not rig.work()
    rig.clock.advance(0.1)
    rig.flush()
    assert handled == ["x"]
    [deleted] = log.entries("DeleteMessageBatch")
    assert deleted["ReceiptHandle"] == delivery.message.receipt_handle != first_receipt
    assert rig.depth() == (0, 0)


def test_a_retried_receive_is_fenced_once_the_budget_is_spent(moto_sqs):
    """Issue 11, defect 1: botocore retried a failed ReceiveMessage (5 attempts, each with the
    same WaitTimeSeconds) without asking the gate, so a fenced instance kept polling."""
    rig = Rig(moto_sqs, clock=FakeClock(), wait_time_s=5)
    budget: list[float] = [30.0]
    rig.gate.set_budget(lambda: budget[0])
    attempts: list[float] = []

    def time_out_and_spend_the_budget(**_: object) -> None:
        attempts.append(budget[0])
        budget[0] = 3.0  # while the attempt hung, peers' clocks ran on: a 5 s poll won't fit
        raise ReadTimeoutError(endpoint_url=rig.url)

    moto_sqs.meta.events.register("before-send.sqs.ReceiveMessage", time_out_and_spend_the_budget)
    assert rig.poller.run_once() > 0  # backs off, as when the gate refuses up front
    assert attempts == [30.0]  # no retry: the gate refused it

    budget[0] = 30.0  # renewed: retries are allowed again while they fit
    moto_sqs.meta.events.unregister("before-send.sqs.ReceiveMessage", time_out_and_spend_the_budget)
    rig.send("x")
    assert rig.receive() == 1
