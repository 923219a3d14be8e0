"""The acknowledger against moto: batching, linger, retries of failed entries.

moto never fails a DeleteMessageBatch entry and accepts stale receipt handles, so failures
are simulated with a botocore `before-call` hook that answers in SQS's place (see `Faults`).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError
from enginekit import CallLog, Faults, Rig
from support import FakeClock

from sqsbalancerd.clock import Clock, SystemClock
from sqsbalancerd.engine.acks import MAX_ATTEMPTS


def handled_rig(moto_sqs: Any, count: int, *, clock: Clock | None = None) -> Rig:
    """A rig whose `count` messages were received and handled: deletes are pending."""
    rig = Rig(moto_sqs, clock=clock or FakeClock(), capacity=max(10, count))
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


def test_gives_up_after_max_attempts(moto_sqs):
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
