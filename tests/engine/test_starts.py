"""Taking thousands of queues at once: `set_owned` returns at once, pollers start behind it.

The coordinator's round calls `set_owned` and renews the heartbeat after it. Starting one
poller thread per queue inside that call took 17 s for 2,000 queues and 287 s for 10,000
(issue 16: the instance self-fenced the moment its last poller started). The SQS client
here is a stand-in whose receives wait like empty long polls: what is measured is the
engine's start-up, not an emulator's.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from enginekit import standalone_settings
from support import wait_until

from sqsbalancerd.clock import SystemClock
from sqsbalancerd.discovery import QueueInfo
from sqsbalancerd.engine.consumer import INLINE_STARTS, Engine, HandlerSet
from sqsbalancerd.handler import ResolvedHandler
from sqsbalancerd.runtime import ThreadSupervisor
from sqsbalancerd.stats import Stats

QUEUES = 3_000
# What a round may spend in set_owned: far below a heartbeat interval.
SET_OWNED_BOUND_S = 1.0


class LongPolls:
    """Receives that return nothing after their WaitTimeSeconds (or at `end`)."""

    def __init__(self) -> None:
        self.end = threading.Event()
        self._lock = threading.Lock()
        self.polled: set[str] = set()

    def receive_message(self, **params: Any) -> dict[str, Any]:
        with self._lock:
            self.polled.add(params["QueueUrl"])
        self.end.wait(params.get("WaitTimeSeconds", 0))
        return {}

    def change_message_visibility_batch(self, **params: Any) -> dict[str, Any]:
        return {"Successful": [], "Failed": []}

    def delete_message_batch(self, **params: Any) -> dict[str, Any]:
        return {"Successful": [], "Failed": []}


def build(sqs: LongPolls, supervisor: ThreadSupervisor) -> Engine:
    resolved = ResolvedHandler(path="t:h", function=lambda m: None, is_async=False, is_batch=False)
    return Engine(
        sqs=sqs,  # type: ignore[arg-type]
        settings=standalone_settings(sqs={"wait_time_seconds": 20}),
        handlers=HandlerSet(default=resolved, by_path={}),
        stats=Stats(),
        clock=SystemClock(),
        spawner=supervisor,
    )


def infos(count: int) -> list[QueueInfo]:
    return [
        QueueInfo(
            name=f"work-{i:05d}", url=f"https://sqs.local/0/work-{i:05d}", visibility_timeout_s=30
        )
        for i in range(count)
    ]


def test_taking_thousands_of_queues_does_not_hold_the_callers_round():
    sqs, supervisor = LongPolls(), ThreadSupervisor()
    engine = build(sqs, supervisor)
    engine.start()
    queues = infos(QUEUES)
    rounds: list[float] = []
    returned = threading.Event()

    def coordinator_round(stop: threading.Event) -> None:
        engine.set_owned(queues)  # the round that takes the share...
        returned.set()
        while not stop.wait(0.05):  # ...and the rounds after it (renewals)
            rounds.append(time.monotonic())

    round_stop = threading.Event()
    started_s = time.monotonic()
    supervisor.spawn("round", coordinator_round, round_stop)
    try:
        assert returned.wait(SET_OWNED_BOUND_S * 30), "set_owned never returned"
        set_owned_s = time.monotonic() - started_s
        assert set_owned_s < SET_OWNED_BOUND_S, f"set_owned took {set_owned_s:.2f} s"
        assert len(engine.owned()) == QUEUES  # owned at once, started as the starter gets to it
        wait_until(lambda: len(sqs.polled) == QUEUES, timeout_s=90, what="every queue polled")
        all_polled_s = time.monotonic() - started_s
        # The round went on renewing while the pollers started (every 0.05 s, with slack
        # for a loaded machine): no gap of more than a second between two rounds.
        gaps = [b - a for a, b in itertools.pairwise(rounds)]
        assert rounds and rounds[0] - started_s < SET_OWNED_BOUND_S + 0.5
        assert max(gaps, default=0.0) < 1.0, f"a round waited {max(gaps):.2f} s"
        assert len(rounds) >= all_polled_s / 0.05 / 4, (len(rounds), all_polled_s)
        assert len(engine._owned) == QUEUES and not engine._pending
    finally:
        round_stop.set()
        sqs.end.set()
        engine.stop_receiving()
        engine.stop(timeout_s=5)
        assert supervisor.stop_all(timeout_s=30) == []


def test_a_queue_dropped_before_its_start_is_never_polled():
    sqs, supervisor = LongPolls(), ThreadSupervisor()
    engine = build(sqs, supervisor)  # not started: no starter thread, starts are inline only
    queues = infos(3 * INLINE_STARTS)
    try:
        engine.set_owned(queues)
        assert len(engine._owned) == INLINE_STARTS  # the rest wait for the starter
        assert len(engine.owned()) == len(queues)
        kept = queues[: 2 * INLINE_STARTS + 5]
        engine.set_owned(kept)  # starts INLINE_STARTS more itself
        assert engine.owned() == tuple(q.name for q in kept)
        assert len(engine._owned) == 2 * INLINE_STARTS
        assert engine.start_pending() == 5
        wait_until(lambda: len(sqs.polled) == len(kept), timeout_s=30, what="kept queues polled")
        assert sqs.polled == {q.url for q in kept}
    finally:
        sqs.end.set()
        engine.stop_receiving()
        engine.stop(timeout_s=5)
        assert supervisor.stop_all(timeout_s=30) == []
