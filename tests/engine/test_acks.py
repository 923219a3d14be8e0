"""The acknowledger against moto: batching, linger, retries of failed entries.

moto never fails a DeleteMessageBatch entry and accepts stale receipt handles, so failures
are simulated with a botocore `before-call` hook that answers in SQS's place (see `Faults`).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError
from enginekit import CallLog, Faults, Rig, Throttle, make_item, make_queue, standalone_settings
from support import FakeClock, wait_until

from sqsbalancerd.app import ack_options
from sqsbalancerd.aws import sqs_client
from sqsbalancerd.clock import Clock, SystemClock
from sqsbalancerd.engine import acks as acks_module
from sqsbalancerd.engine.acks import MAX_ATTEMPTS, MAX_BACKOFF_S, Acknowledger
from sqsbalancerd.stats import Stats


def handled_rig(moto_sqs: Any, count: int, *, clock: Clock | None = None) -> Rig:
    """A rig whose `count` messages were received and handled: deletes are pending."""
    # Room for every message plus one more full receive: reservations are whole batches.
    rig = Rig(moto_sqs, clock=clock or FakeClock(), capacity=count + 10)
    rig.send(*[f"m{n}" for n in range(count)])
    while rig.dispatcher.depth() < count:
        assert rig.receive() > 0
    assert rig.work_all() == count
    return rig


def test_deletes_go_out_ten_per_call_at_once_and_the_rest_after_the_linger(moto_sqs):
    clock = FakeClock()
    rig = handled_rig(moto_sqs, 25, clock=clock)
    log = CallLog(moto_sqs)

    assert rig.acks.run_once() == 20  # two full batches: no linger
    assert [len(p["Entries"]) for p in log.of("DeleteMessageBatch")] == [10, 10]
    assert rig.depth() == (0, 5)

    assert rig.acks.run_once() == 0  # the last 5 wait for the linger
    clock.advance(0.1)
    assert rig.acks.run_once() == 5
    assert [len(p["Entries"]) for p in log.of("DeleteMessageBatch")] == [10, 10, 5]
    assert not log.of("DeleteMessage")
    assert rig.depth() == (0, 0)
    assert rig.counters()["deleted"] == 25


def test_deletes_lingering_behind_a_due_one_ride_in_its_call(moto_sqs):
    """Handlers finishing a few milliseconds apart: once the first delete's linger is out,
    the later ones of its queue go in the same call (still within their own linger), not
    one call each as their lingers end in turn."""
    clock = FakeClock()
    rig = Rig(moto_sqs, clock=clock, capacity=20)
    rig.send(*[f"m{n}" for n in range(4)])
    while rig.dispatcher.depth() < 4:
        assert rig.receive() > 0
    log = CallLog(moto_sqs)
    for _ in range(4):
        assert rig.work()
        clock.advance(0.03)
        rig.acks.run_once()
    assert [len(p["Entries"]) for p in log.of("DeleteMessageBatch")] == [4]
    assert rig.depth() == (0, 0)


def test_a_failed_entry_is_retried_alone_and_counted(moto_sqs):
    clock = FakeClock()
    rig = handled_rig(moto_sqs, 3, clock=clock)
    faults = Faults(moto_sqs, "DeleteMessageBatch", [{1: "InternalError"}])
    log = CallLog(moto_sqs)
    clock.advance(0.1)

    assert rig.acks.run_once() == 3
    assert rig.counters()["ack_retried"] == 1
    assert rig.counters()["deleted"] == 2
    assert rig.depth() == (0, 1)  # entry 1 was not deleted
    failed_handle = log.entries("DeleteMessageBatch")[1]["ReceiptHandle"]

    assert rig.acks.run_once() == 0  # backing off
    clock.advance(1.0)
    assert rig.acks.run_once() == 1
    assert log.entries("DeleteMessageBatch")[3:] == [{"Id": "0", "ReceiptHandle": failed_handle}]
    assert rig.depth() == (0, 0)
    assert rig.counters()["deleted"] == 3
    assert rig.counters()["delete_failed"] == 0
    assert faults.intercepted == 1


@pytest.mark.parametrize("code", ["ReceiptHandleIsInvalid", "InvalidParameterValue"])
def test_permanent_receipt_handle_errors_are_not_retried(moto_sqs, code):
    clock = FakeClock()
    rig = handled_rig(moto_sqs, 2, clock=clock)
    Faults(moto_sqs, "DeleteMessageBatch", [{0: code}])
    log = CallLog(moto_sqs)
    clock.advance(0.1)

    assert rig.acks.run_once() == 2
    clock.advance(60)
    rig.acks.run_once()
    rig.acks.flush_all()
    assert len(log.of("DeleteMessageBatch")) == 1
    assert rig.counters()["delete_failed"] == 1
    assert rig.counters()["ack_retried"] == 0
    assert rig.acks.pending_total() == 0


def test_a_call_that_raises_is_retried_whole(moto_sqs):
    clock = FakeClock()
    rig = handled_rig(moto_sqs, 4, clock=clock)
    Faults(moto_sqs, "DeleteMessageBatch", [EndpointConnectionError(endpoint_url="x")])
    clock.advance(0.1)

    assert rig.acks.run_once() == 4
    assert rig.depth() == (0, 4)
    assert rig.counters()["ack_retried"] == 4
    clock.advance(1.0)
    assert rig.acks.run_once() == 4
    assert rig.depth() == (0, 0)
    assert rig.counters()["deleted"] == 4


def test_gives_up_after_max_attempts(moto_sqs, monkeypatch):
    monkeypatch.setattr(acks_module, "FLUSH_BACKOFF_S", 0.0)  # flush_all's pauses
    rig = handled_rig(moto_sqs, 1)
    Faults(moto_sqs, "DeleteMessageBatch", [{0: "InternalError"}] * (MAX_ATTEMPTS + 5))
    log = CallLog(moto_sqs)
    rig.acks.flush_all()
    assert len(log.of("DeleteMessageBatch")) == MAX_ATTEMPTS
    assert rig.counters()["delete_failed"] == 1
    assert rig.acks.pending_total() == 0


def test_a_retried_change_does_not_hold_up_newer_ones(moto_sqs):
    clock = FakeClock()
    rig = Rig(moto_sqs, clock=clock)
    rig.send("a", "b")
    assert rig.receive() == 2
    first, second = rig.dispatcher.stop_receiving()
    Faults(moto_sqs, "ChangeMessageVisibilityBatch", [{0: "InternalError"}])
    rig.acks.change_visibility([first], 0, reason="release")
    assert rig.acks.run_once() == 1  # fails; retried after a backoff

    rig.acks.change_visibility([second], 0, reason="release")
    assert rig.acks.run_once() == 1  # sent now, not after the first one's backoff
    assert rig.depth() == (1, 1)
    clock.advance(1.0)
    assert rig.acks.run_once() == 1
    assert rig.depth() == (2, 0)
    assert rig.counters()["released"] == 2


def test_the_loop_sleeps_while_retries_back_off(moto_sqs):
    """Ten entries waiting out a backoff must not make the acks loop spin."""
    rig = handled_rig(moto_sqs, 10, clock=SystemClock())
    rig.acks.set_extension_source(lambda now_s: [], every_s=1.0)  # as the engine does
    Faults(moto_sqs, "DeleteMessageBatch", [dict.fromkeys(range(10), "InternalError")])
    rounds = 0
    deadline = time.monotonic() + 10
    while rig.counters().get("deleted", 0) < 10 and time.monotonic() < deadline:
        rig.acks.run_once(wait=True)
        rounds += 1
    assert rig.counters()["deleted"] == 10
    assert rounds < 30, f"{rounds} rounds: the loop spun instead of waiting"


# -- throttling: the acknowledger retries, not botocore ----------------------------------


def ack_client() -> Any:
    """The daemon's acks client (app.ack_options: one attempt per call), on moto's mock."""
    return sqs_client(ack_options(standalone_settings()))


def shared_rigs(client: Any, moto_sqs: Any, clock: Clock, **policy: Any) -> tuple[Rig, Rig]:
    """Two queues behind one acknowledger on `client`: "slow" (throttled) and "fast"."""
    stats = Stats()
    acks = Acknowledger(client, stats=stats, clock=clock)
    slow = Rig(moto_sqs, name="work-slow", clock=clock, acks=acks, stats=stats, **policy)
    fast = Rig(moto_sqs, name="work-fast", clock=clock, acks=acks, stats=stats)
    return slow, fast


def test_a_throttled_queue_does_not_hold_up_another_queues_deletes(moto_sqs):
    clock = FakeClock()
    client = ack_client()
    # Long visibility: the receipt handles stay ours for the whole test.
    slow, fast = shared_rigs(client, moto_sqs, clock, visibility_timeout_s=600)
    acks = slow.acks
    throttle = Throttle(client, "DeleteMessageBatch", [slow.url])
    log = CallLog(client)
    slow.send(*[f"s{n}" for n in range(10)])
    slow.handled(10)

    rounds = MAX_ATTEMPTS + 3  # transient failures are retried past MAX_ATTEMPTS
    for n in range(1, rounds + 1):
        fast.send(f"f{n}")
        fast.handled(1)
        clock.advance(MAX_BACKOFF_S)  # the slow retry and the fast linger are both due
        acks.run_once()
        # The slow queue's batch went first and was throttled; the fast one went out anyway.
        assert throttle.attempts[slow.url] == n
        assert fast.counters()["deleted"] == n
        assert fast.depth() == (0, 0)
        assert slow.depth() == (0, 10)
        assert acks.pending_for(slow.url) == 10  # kept for the next round, none given up
    # One HTTP attempt per call: the retries were the acknowledger's, not botocore's.
    slow_calls = [p for p in log.of("DeleteMessageBatch") if p["QueueUrl"] == slow.url]
    assert len(slow_calls) == rounds

    throttle.stop()
    assert acks.run_once() == 0  # each retry waits out its backoff
    clock.advance(MAX_BACKOFF_S)
    assert acks.run_once() == 10
    assert slow.depth() == (0, 0)
    assert slow.counters()["deleted"] == 10
    assert slow.counters()["ack_retried"] == throttle.entries[slow.url] == 10 * rounds
    assert slow.counters()["delete_failed"] == 0
    assert acks.pending_total() == 0


def test_what_failed_together_is_retried_together(moto_sqs):
    """One backoff per failed batch: its entries come due at once, in one call, not ten."""
    clock = FakeClock()
    client = ack_client()
    slow, _ = shared_rigs(client, moto_sqs, clock)
    throttle = Throttle(client, "DeleteMessageBatch", [slow.url])
    log = CallLog(client)
    slow.send(*[f"s{n}" for n in range(10)])
    slow.handled(10)
    clock.advance(0.1)
    assert slow.acks.run_once() == 10
    throttle.stop()
    for _ in range(1000):  # in small steps, to catch the first retry that comes due
        clock.advance(0.01)
        if slow.acks.run_once():
            break
    assert [len(p["Entries"]) for p in log.of("DeleteMessageBatch")] == [10, 10]
    assert slow.counters()["deleted"] == 10


def test_a_throttled_delete_is_given_up_once_its_receipt_may_be_stale(moto_sqs):
    """Past MAX_ATTEMPTS, a transient failure is retried only until the visibility timeout
    lapses: then the message may have been received again, under another receipt handle."""
    clock = FakeClock()
    client = ack_client()
    slow, _ = shared_rigs(client, moto_sqs, clock, visibility_timeout_s=60)
    throttle = Throttle(client, "DeleteMessageBatch", [slow.url])
    slow.send("x")
    slow.handled(1)

    for _ in range(100):
        clock.advance(MAX_BACKOFF_S)
        slow.acks.run_once()
        if not slow.acks.pending_total():
            break
    # Attempts at 5 s, 10 s, ... 60 s: the one at 60 s found the visibility lapsed.
    assert throttle.attempts[slow.url] == 60 // MAX_BACKOFF_S
    assert slow.counters()["delete_failed"] == 1
    assert slow.counters()["ack_retried"] == 60 // MAX_BACKOFF_S - 1


def test_a_batch_in_flight_still_counts_as_pending(moto_sqs):
    """Pollers read pending_for while the acks thread waits for an answer (backpressure)."""
    clock = FakeClock()
    rig = handled_rig(moto_sqs, 10, clock=clock)
    seen: list[int] = []

    def in_flight(**_: Any) -> None:
        seen.append(rig.acks.pending_for(rig.url))

    moto_sqs.meta.events.register("before-call.sqs.DeleteMessageBatch", in_flight)
    Faults(moto_sqs, "DeleteMessageBatch", [EndpointConnectionError(endpoint_url="x")])
    assert rig.acks.run_once() == 10
    assert rig.acks.pending_for(rig.url) == 10  # failed: back in the list
    clock.advance(MAX_BACKOFF_S)
    assert rig.acks.run_once() == 10
    assert seen == [10, 10]
    assert rig.acks.pending_for(rig.url) == 0
    assert rig.acks.pending_total() == 0


def test_the_acks_thread_keeps_other_queues_deletes_flowing_while_one_is_throttled(moto_sqs):
    """The real loop on its own thread, the daemon's acks client, the wall clock."""
    client = ack_client()
    slow, fast = shared_rigs(client, moto_sqs, SystemClock())
    acks = slow.acks
    throttle = Throttle(client, "DeleteMessageBatch", [slow.url])
    slow.send(*[f"s{n}" for n in range(10)])
    fast.send(*[f"f{n}" for n in range(10)])
    stop = threading.Event()
    thread = threading.Thread(target=acks.run, args=(stop,), name="test-acks", daemon=True)
    thread.start()
    try:
        slow.handled(10)  # a full batch: sent at once, and throttled
        throttle.wait_for(slow.url, 1)

        fast.handled(10)
        # botocore's 5 attempts would hold the thread for seconds (backoff up to 1+2+4+8 s).
        wait_until(
            lambda: fast.counters().get("deleted") == 10,
            timeout_s=2.0,
            what="the other queue's deletes, sent while the first is throttled",
        )
        assert fast.depth() == (0, 0)
        assert slow.depth() == (0, 10)
        assert acks.pending_for(slow.url) == 10

        throttle.wait_for(slow.url, 3)  # still retried by the acknowledger
        throttle.stop()
        wait_until(
            lambda: slow.counters().get("deleted") == 10,
            timeout_s=10.0,
            what="the throttled deletes, once throttling stops",
        )
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert slow.depth() == (0, 0)
    assert slow.counters()["ack_retried"] == throttle.entries[slow.url]
    assert slow.counters()["delete_failed"] == 0
    assert acks.pending_total() == 0


# -- one decision per receipt, never after its visibility ran out ---------------------------


def received_rig(moto_sqs: Any, count: int, clock: FakeClock) -> Rig:
    rig = Rig(moto_sqs, clock=clock, capacity=count + 10, visibility_timeout_s=30)
    rig.send(*[f"m{n}" for n in range(count)])
    assert rig.receive() == count
    return rig


def test_a_receipt_takes_one_decision_only(moto_sqs):
    clock = FakeClock()
    rig = received_rig(moto_sqs, 1, clock)
    log = CallLog(moto_sqs)
    [delivery] = rig.dispatcher.held_deliveries()
    rig.acks.change_visibility([delivery], 60, reason="retry")
    rig.acks.change_visibility([delivery], 0, reason="release")  # a second decision: ignored
    rig.acks.delete([delivery])  # so is a third
    rig.acks.run_once(force=True)
    assert [e["VisibilityTimeout"] for e in log.entries("ChangeMessageVisibilityBatch")] == [60]
    assert not log.of("DeleteMessageBatch")


def test_no_extension_after_a_decision(moto_sqs):
    clock = FakeClock()
    rig = received_rig(moto_sqs, 1, clock)
    log = CallLog(moto_sqs)
    [delivery] = rig.dispatcher.held_deliveries()
    extension = rig.acks  # the extension source saw it held, then the worker decided
    rig.acks.set_extension_source(lambda now: [(delivery, 30)], every_s=1.0)
    delivery.decision = "release"
    extension.run_once()
    assert not log.of("ChangeMessageVisibilityBatch")


def test_a_change_after_the_visibility_ran_out_is_dropped(moto_sqs, caplog):
    clock = FakeClock()
    rig = received_rig(moto_sqs, 2, clock)
    log = CallLog(moto_sqs)
    lapsed: list[str] = []
    rig.acks.set_lapse_handler(lambda d: lapsed.append(d.message.body))
    late, released = rig.dispatcher.held_deliveries()
    clock.advance(30)  # both receipts' visibility has run out
    rig.acks.set_extension_source(lambda now: [(late, 30)], every_s=1.0)
    rig.acks.change_visibility([released], 0, reason="release")
    rig.acks.run_once()
    assert not log.of("ChangeMessageVisibilityBatch")  # SQS would answer MessageNotInflight
    assert rig.counters()["lapsed"] == 2
    assert late.is_expired and lapsed == [late.message.body]  # this copy must not run
    assert any("visibility ran out" in r.getMessage() for r in caplog.records)


def test_visibility_is_counted_from_when_the_extension_was_sent(moto_sqs):
    clock = FakeClock()
    rig = received_rig(moto_sqs, 1, clock)
    [delivery] = rig.dispatcher.held_deliveries()
    sent_at = clock.monotonic()

    def slow_call(*args: Any, **kwargs: Any) -> dict[str, Any]:
        clock.advance(2.0)  # the answer takes 2 s to come back
        return {"Successful": [{"Id": "0"}], "Failed": []}

    slow = type("Slow", (), {"change_message_visibility_batch": staticmethod(slow_call)})()
    rig.acks._sqs = slow
    rig.acks.change_visibility([delivery], 30, reason="extend")
    rig.acks.run_once(force=True)
    assert delivery.visible_until_s == sent_at + 30


def test_a_lone_delete_goes_out_within_the_linger(moto_sqs):
    """The thread sleeps up to a second between extension checks: a lone delete must wake
    it, or a FIFO group and the SIGKILL duplicate window wait for that second."""
    rig = Rig(moto_sqs, clock=SystemClock(), capacity=20)
    rig.send("m")
    assert rig.receive() == 1
    log = CallLog(moto_sqs)
    stop = threading.Event()
    ticked = rig.acks.last_tick_s
    thread = threading.Thread(target=rig.acks.run, args=(stop,), name="sqsb-test-acks")
    thread.start()
    try:
        # It ticks, then waits up to a second for something to send.
        wait_until(lambda: rig.acks.last_tick_s != ticked, timeout_s=5, every_s=0.001)
        started = time.monotonic()
        rig.work()
        wait_until(lambda: log.of("DeleteMessageBatch"), timeout_s=5, every_s=0.005)
        assert time.monotonic() - started < 0.5
    finally:
        stop.set()
        thread.join(5)


def test_no_list_is_kept_per_queue_once_its_operations_are_sent(moto_sqs):
    clock = FakeClock()
    rig = handled_rig(moto_sqs, 3, clock=clock)
    clock.advance(0.1)
    rig.acks.run_once()
    assert rig.acks.pending_total() == 0
    assert not rig.acks._deletes and not rig.acks._changes  # queues come and go


def test_a_release_after_the_acks_thread_stopped_is_sent_from_the_caller(moto_sqs):
    """A poll that outlived the drain hands its messages back after the thread ended."""
    rig = Rig(moto_sqs, clock=FakeClock(), capacity=20)
    rig.send("late")
    assert rig.receive() == 1
    stop = threading.Event()
    stop.set()
    rig.acks.run(stop)  # flushes and ends at once
    log = CallLog(moto_sqs)
    rig.acks.change_visibility(rig.dispatcher.stop_receiving(), 0, reason="release")
    assert [e["VisibilityTimeout"] for e in log.entries("ChangeMessageVisibilityBatch")] == [0]
    assert rig.depth() == (1, 0)


def test_a_poller_held_back_by_the_backlog_is_woken_when_it_drains(moto_sqs):
    """Held-back pollers wait on the acknowledger instead of re-checking every 50 ms: a
    thousand of them spinning starved the one thread that sends the acks."""
    clock = FakeClock()
    rig = handled_rig(moto_sqs, acks_module.MAX_PENDING_PER_QUEUE, clock=clock)
    assert rig.acks.is_behind(rig.url)
    woke: list[bool] = []
    waiter = threading.Thread(
        target=lambda: woke.append(rig.acks.wait_caught_up(rig.url, timeout_s=10)),
        name="sqsb-test-waiter",
    )
    started = time.monotonic()
    waiter.start()
    clock.advance(0.1)
    rig.acks.run_once()  # the deletes go out
    waiter.join(10)
    assert woke == [True]
    assert time.monotonic() - started < 5  # woken, not timed out
    assert rig.acks.pending_total() == 0


def test_a_held_back_poller_returns_at_once_when_receiving_stops(moto_sqs):
    """Held-back pollers wait up to seconds for the backlog: the drain must not wait that
    long for them (their threads would outlive the shutdown)."""
    rig = handled_rig(moto_sqs, acks_module.MAX_PENDING_PER_QUEUE, clock=FakeClock())
    assert rig.acks.is_behind(rig.url)
    returned = threading.Event()

    def wait() -> None:
        rig.acks.wait_caught_up(rig.url, timeout_s=30)
        returned.set()

    waiter = threading.Thread(target=wait, name="sqsb-test-waiter")
    waiter.start()
    rig.acks.wake_held_back()
    assert returned.wait(5)
    waiter.join(5)


class CountingSqs:
    """Answers every batch call at once, successfully; counts the calls."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def delete_message_batch(self, *, QueueUrl: str, Entries: list[Any]) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
        return {"Successful": [{"Id": e["Id"]} for e in Entries], "Failed": []}


def test_a_linger_running_out_wakes_one_sender_not_all_of_them():
    """Four senders waiting for the same linger deadline all woke at it, and three found
    nothing to send: ~18 sender rounds per batch at 600 messages/s. One keeps time; the
    others sleep until it leaves to send."""
    sqs = CountingSqs()
    acks = Acknowledger(sqs, stats=Stats(), clock=SystemClock())  # type: ignore[arg-type]
    rounds = []
    flush_due = acks._flush_due

    def counted_flush(**kwargs: Any) -> int:
        rounds.append(threading.current_thread().name)
        return flush_due(**kwargs)

    acks._flush_due = counted_flush  # type: ignore[method-assign]
    stop = threading.Event()
    senders = [threading.Thread(target=acks.run, args=(stop,), name="sqsb-test-acks-0")]
    senders += [
        threading.Thread(target=acks.run_sender, args=(stop,), name=f"sqsb-test-acks-{n}")
        for n in range(1, acks_module.SENDER_THREADS)
    ]
    queues = [make_queue(f"q{n}") for n in range(5)]
    for sender in senders:
        sender.start()
    try:
        # Let every sender reach its wait, then one delete per queue every 20 ms: each
        # starts a linger of its own.
        wait_until(lambda: len(rounds) >= len(senders), timeout_s=5, every_s=0.001)
        rounds.clear()
        for n in range(25):
            acks.delete(make_item(queues[n % len(queues)]).deliveries)
            stop.wait(0.02)
        wait_until(lambda: acks.pending_total() == 0, timeout_s=5, what="every delete sent")
        sent = sqs.calls
        wasted = len(rounds) - sent
    finally:
        stop.set()
        for sender in senders:
            sender.join(5)
    # Before, each linger running out woke all four: 93 rounds found nothing for 25 calls.
    # Now only the spares' 1 s rechecks and a rare race do.
    assert wasted <= 10, (wasted, sent, rounds)
