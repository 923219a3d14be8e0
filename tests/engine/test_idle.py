"""The idle pacer with a fake clock: when an empty queue's next long poll may start."""

from __future__ import annotations

import threading

import pytest
from enginekit import CallLog, Rig
from support import FakeClock

from sqsbalancerd.engine.idle import IDLE_AFTER_S, MAX_WAIT_S, IdlePacer

WAIT_S = 20.0  # the long poll


def empty_poll(pacer: IdlePacer, clock: FakeClock, *, poll_s: float = WAIT_S) -> float:
    """One long poll that returned nothing; then the wait the pacer asks for, waited out."""
    started = clock.monotonic()
    clock.advance(poll_s)
    wait_s = pacer.after_receive(0, started_s=started, now_s=clock.monotonic())
    waited = 0.0
    while wait_s:
        clock.advance(wait_s)
        waited += wait_s
        wait_s = pacer.wait_s(clock.monotonic())
    return waited


def test_off_by_default_polls_continuously():
    pacer, clock = IdlePacer(0.0), FakeClock()
    assert [empty_poll(pacer, clock) for _ in range(20)] == [0.0] * 20
    assert not pacer.is_idling
    assert pacer.requests_per_hour(WAIT_S) == 180


def test_an_empty_queue_idles_after_a_minute_then_waits_the_budget_between_polls():
    pacer, clock = IdlePacer(300.0), FakeClock()
    waits = [empty_poll(pacer, clock) for _ in range(6)]

    # Three empty 20 s polls make a minute (IDLE_AFTER_S): from then on, 300 s apart.
    assert IDLE_AFTER_S == 60
    assert waits == [0.0, 0.0, 300.0, 300.0, 300.0, 300.0]
    assert pacer.is_idling
    assert pacer.requests_per_hour(WAIT_S) == pytest.approx(3600 / 320)  # ~11 an hour


def test_a_short_budget_idles_after_the_budget_not_a_minute():
    pacer, clock = IdlePacer(60.0), FakeClock()
    assert [empty_poll(pacer, clock) for _ in range(4)] == [0.0, 0.0, 60.0, 60.0]
    assert pacer.requests_per_hour(WAIT_S) == 45  # 3600 / (20 + 60)
    small, clock = IdlePacer(2.0), FakeClock()
    assert [empty_poll(small, clock, poll_s=1.0) for _ in range(3)] == [0.0, 2.0, 2.0]


def test_a_receive_with_messages_ends_the_pause_at_once():
    pacer, clock = IdlePacer(300.0), FakeClock()
    for _ in range(4):
        empty_poll(pacer, clock)
    assert pacer.is_idling

    now = clock.monotonic()
    assert pacer.after_receive(3, started_s=now, now_s=now) == 0.0
    assert not pacer.is_idling and pacer.wait_s(now) == 0.0
    # The count starts again: one empty poll after messages does not pause.
    assert empty_poll(pacer, clock) == 0.0


def test_a_queue_holding_messages_is_never_idle():
    """A FIFO group held back (its receives come back empty) or handlers still running."""
    pacer, clock = IdlePacer(60.0), FakeClock()
    for _ in range(10):
        started = clock.monotonic()
        clock.advance(WAIT_S)
        now = clock.monotonic()
        assert pacer.after_receive(0, started_s=started, now_s=now, is_holding=True) == 0.0
    assert not pacer.is_idling


def test_a_long_pause_is_waited_in_bounded_steps_that_do_not_lengthen_it():
    pacer, clock = IdlePacer(300.0), FakeClock()
    for _ in range(2):
        empty_poll(pacer, clock)
    started = clock.monotonic()
    clock.advance(WAIT_S)
    steps = [pacer.after_receive(0, started_s=started, now_s=clock.monotonic())]
    while steps[-1]:
        clock.advance(steps[-1])
        steps.append(pacer.wait_s(clock.monotonic()))

    assert max(steps) == MAX_WAIT_S
    assert sum(steps) == 300.0


def test_worst_pickup_latency_is_the_budget():
    """A message sent at any moment of the cycle is picked up when the next poll starts
    (or at once, by a poll under way): never later than the budget after it was sent."""
    budget = 60.0
    pacer, clock = IdlePacer(budget), FakeClock()
    for _ in range(3):
        empty_poll(pacer, clock)
    cycle_start = clock.monotonic()
    empty_poll(pacer, clock)  # one whole idle cycle: a poll, then the pause
    next_poll = clock.monotonic()
    latencies = [
        0.0 if t < WAIT_S else next_poll - (cycle_start + t)
        for t in [x * 0.5 for x in range(int((WAIT_S + budget) / 0.5))]
    ]
    assert max(latencies) == budget


# -- the poller's hook, against moto ---------------------------------------------------------


def test_an_idle_pollers_receives_are_spaced_and_messages_end_the_pause(moto_sqs):
    clock = FakeClock()
    rig = Rig(moto_sqs, clock=clock, wait_time_s=0, idle_latency_s=5.0)
    log = CallLog(moto_sqs)

    assert rig.poller.run_once() == 0.0  # empty, not yet for long
    clock.advance(5)
    assert rig.poller.run_once() == 5.0  # empty for the budget: idle, wait 5 s
    assert rig.poller.run_once() == 5.0  # still waiting: no receive
    assert len(log.of("ReceiveMessage")) == 2
    clock.advance(5)
    assert rig.poller.run_once() == 5.0  # one receive, empty again: another 5 s
    assert len(log.of("ReceiveMessage")) == 3
    assert rig.poller.idle.is_idling

    rig.send("wake")
    clock.advance(5)
    assert rig.poller.run_once() == 0.0  # the next poll finds it: back to continuous
    assert rig.dispatcher.depth() == 1 and not rig.poller.idle.is_idling
    clock.advance(10)
    assert rig.poller.run_once() == 0.0  # holding the message: not idle, however empty
    assert len(log.of("ReceiveMessage")) == 5


def test_the_default_and_extra_receivers_never_pause(moto_sqs):
    clock = FakeClock()
    rig = Rig(moto_sqs, clock=clock, wait_time_s=0)
    for _ in range(5):
        clock.advance(100)
        assert rig.poller.run_once() == 0.0
    assert not rig.poller.idle.is_idling
    extra = Rig(moto_sqs, name="work-b", clock=clock, wait_time_s=0, idle_latency_s=1.0)
    extra.poller.idle = IdlePacer(0.0)  # as an extra receiver gets it
    for _ in range(5):
        clock.advance(100)
        assert extra.poller.run_once() == 0.0


def test_a_drain_ends_an_idle_pause_at_once(moto_sqs):
    clock = FakeClock()
    rig = Rig(moto_sqs, clock=clock, wait_time_s=0, idle_latency_s=300.0)
    log = CallLog(moto_sqs)
    rig.poller.run_once()
    clock.advance(60)
    assert rig.poller.run_once() == MAX_WAIT_S  # idling: the thread waits on its stop event
    stop = threading.Event()
    thread = threading.Thread(target=rig.poller.run, args=(stop,), name="test-idle-poller")
    thread.start()

    stop.set()  # what stop_receiving and giving the queue up do
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert len(log.of("ReceiveMessage")) == 2
