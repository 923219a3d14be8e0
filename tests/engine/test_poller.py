"""The poller against moto: it receives only what it has room for, and gives back the rest."""

from __future__ import annotations

import logging
import threading

from botocore.exceptions import EndpointConnectionError
from enginekit import CallLog, Rig
from support import FakeClock

from sqsbalancerd.clock import SystemClock


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
    assert "VisibilityTimeout" not in params  # the queue's own timeout applies
    assert "ReceiveRequestAttemptId" not in params


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


def test_receive_budget_bounds_the_long_poll(moto_sqs):
    rig = Rig(moto_sqs, clock=FakeClock(), wait_time_s=20)
    log = CallLog(moto_sqs)
    rig.send("x")
    budget: list[float | None] = [5.0]
    rig.gate.set_budget(lambda: budget[0])
    assert rig.receive() == 1
    assert log.of("ReceiveMessage")[0]["WaitTimeSeconds"] == 4  # one second of slack

    budget[0] = 0.5  # too little left to start a receive
    assert rig.poller.run_once() > 0
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
