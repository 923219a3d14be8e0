"""In-process counters and the snapshot later exposed over HTTP, in `status` and at stop.

Counters are plain integers behind one lock: the hot path pays a dict lookup and an add,
and Prometheus reads a snapshot at scrape time (observability/metrics.py) instead of
keeping a second set of counters.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from dataclasses import dataclass, field

# Seconds; shared by the handler-duration and message-age histograms.
HISTOGRAM_BUCKETS_S: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)

QUEUE_COUNTERS = (
    "received",
    "succeeded",
    "failed",
    "retried",
    "deleted",
    "delete_failed",
    "released",
    "expired",
    "ack_retried",
    "timed_out",
    "held_back",
    "answer_unreadable",
    "lapsed",
    "duplicates",
)


@dataclass(slots=True)
class Histogram:
    """Cumulative-free bucket counts; the last slot counts values above every bound."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(HISTOGRAM_BUCKETS_S) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        # The first bound >= value (the last slot when none is): a C search, not a loop.
        self.counts[bisect.bisect_left(HISTOGRAM_BUCKETS_S, value)] += 1
        self.total += value
        self.n += 1

    def copy(self) -> Histogram:
        return Histogram(counts=list(self.counts), total=self.total, n=self.n)


@dataclass(frozen=True, slots=True)
class QueueStats:
    queue: str
    received: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    deleted: int = 0
    delete_failed: int = 0
    released: int = 0
    expired: int = 0
    ack_retried: int = 0
    timed_out: int = 0  # handler calls past handler_timeout
    held_back: int = 0  # FIFO group-mates held back behind a failed message (not run)
    answer_unreadable: int = 0  # batch answers that did not say which messages failed
    lapsed: int = 0  # decisions dropped: the receipt's visibility had run out first
    duplicates: int = 0  # received again while still held: merged, not run twice
    running: int = 0
    queued: int = 0


@dataclass(frozen=True, slots=True)
class LoadTotals:
    """Cumulative since the queue's counters were created (they reset on `forget_queue`)."""

    handler_s: float = 0.0  # handler time spent on the queue's messages
    received: int = 0  # messages
    receives: int = 0
    full_receives: int = 0


@dataclass(frozen=True, slots=True)
class CoordinationStats:
    mode: str
    is_registered: bool
    members_alive: int
    heartbeat_age_s: float | None
    rebalances: int
    is_fenced: bool
    # Load-aware planning: our utilisation and per-queue handler-s/s as last published,
    # and the owner count of each queue shared among several (None: nothing published).
    utilisation: float | None = None
    queue_loads: dict[str, float] = field(default_factory=dict)
    replicas: dict[str, int] = field(default_factory=dict)
    # Known queues whose ownership row names no live member, as of the last round (None:
    # not counted yet). A few for a round or two is a handoff; lasting, nobody consumes them.
    unowned_queues: int | None = None


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    instance_id: str
    owned_queues: tuple[str, ...]
    queues: tuple[QueueStats, ...]
    workers_busy: int
    pool_size: int
    stuck_slots: int
    work_queue_depth: int
    aws_calls: dict[tuple[str, str, str], int]
    handler_duration: dict[str, Histogram]
    message_age: dict[str, Histogram]
    loop_ticks_age_s: dict[str, float]
    # Per AWS service: failed calls since the last success (0 = last call worked).
    aws_consecutive_failures: dict[str, int] = field(default_factory=dict)
    coordination: CoordinationStats | None = None
    # Seconds the async handlers' event loop has been blocked (None: no such loop).
    event_loop_lag_s: float | None = None
    event_loop_lag_limit_s: float = 60.0
    # Counts of queues no longer owned (forgotten per queue, kept in the totals).
    retired: dict[str, int] = field(default_factory=dict)
    # Owned queues whose long polls are spaced (sqs.idle_latency), and the ReceiveMessage
    # calls an hour the owned queues cost while nothing arrives (engine/idle.py).
    idling_queues: int = 0
    estimated_sqs_requests_per_hour: float = 0.0

    def totals(self) -> dict[str, int]:
        return {
            name: sum(getattr(q, name) for q in self.queues) + self.retired.get(name, 0)
            for name in QUEUE_COUNTERS
        }

    @property
    def aws_call_total(self) -> int:
        return sum(self.aws_calls.values())


class Stats:
    """Thread-safe counters; parts call `count`, `aws_call` and `observe_*`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, dict[str, int]] = defaultdict(
            lambda: dict.fromkeys(QUEUE_COUNTERS, 0)
        )
        self._aws_calls: dict[tuple[str, str, str], int] = defaultdict(int)
        self._durations: dict[str, Histogram] = defaultdict(Histogram)
        self._ages: dict[str, Histogram] = defaultdict(Histogram)
        self._failure_streaks: dict[str, int] = defaultdict(int)
        self._retired: dict[str, int] = dict.fromkeys(QUEUE_COUNTERS, 0)
        # Per queue: [receive calls, receives that came back full] (load signals).
        self._receives: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def forget_queue(self, queue: str) -> None:
        """The queue went away: drop its per-queue counters and histograms (and so its
        metric label sets: queues come and go by the thousand), folding its counts into
        the process totals."""
        with self._lock:
            counters = self._queues.pop(queue, None) or {}
            for name, value in counters.items():
                self._retired[name] += value
            self._durations.pop(queue, None)
            self._ages.pop(queue, None)
            self._receives.pop(queue, None)

    def retired_counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._retired)

    def count(self, queue: str, counter: str, n: int = 1) -> None:
        with self._lock:
            self._queues[queue][counter] += n

    def aws_call(self, service: str, action: str, outcome: str) -> None:
        with self._lock:
            self._aws_calls[(service, action, outcome)] += 1
            if outcome == "ok":
                self._failure_streaks[service] = 0
            elif outcome != "client_error":
                self._failure_streaks[service] += 1

    def observe_handler(self, queue: str, duration_s: float) -> None:
        with self._lock:
            self._durations[queue].observe(duration_s)

    def observe_call(self, queue: str, duration_s: float, ages_s: list[float]) -> None:
        """One handler call: its duration and its messages' ages, under one lock."""
        with self._lock:
            self._durations[queue].observe(duration_s)
            if ages_s:
                histogram = self._ages[queue]
                for age_s in ages_s:
                    histogram.observe(age_s)

    def count_many(self, counts: dict[tuple[str, str], int]) -> None:
        """Several `count`s under one lock: {(queue, counter): n}."""
        with self._lock:
            for (queue, counter), n in counts.items():
                self._queues[queue][counter] += n

    def observe_age(self, queue: str, age_s: float) -> None:
        with self._lock:
            self._ages[queue].observe(age_s)

    def note_receive(self, queue: str, *, is_full: bool) -> None:
        """One receive call answered (load signals: how often receives come back full)."""
        with self._lock:
            counts = self._receives[queue]
            counts[0] += 1
            counts[1] += is_full

    def load_totals(self) -> dict[str, LoadTotals]:
        """Cumulative per-queue figures the load meter turns into rates (loadsignals.py):
        read from what the hot path records anyway, so measuring load costs it nothing."""
        with self._lock:
            names = set(self._durations) | set(self._receives)
            return {
                q: LoadTotals(
                    handler_s=self._durations[q].total if q in self._durations else 0.0,
                    received=self._queues[q]["received"] if q in self._queues else 0,
                    receives=self._receives[q][0] if q in self._receives else 0,
                    full_receives=self._receives[q][1] if q in self._receives else 0,
                )
                for q in names
            }

    def queue_counters(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {q: dict(c) for q, c in self._queues.items()}

    def aws_calls(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            return dict(self._aws_calls)

    def failure_streaks(self) -> dict[str, int]:
        with self._lock:
            return dict(self._failure_streaks)

    def histograms(self) -> tuple[dict[str, Histogram], dict[str, Histogram]]:
        with self._lock:
            return (
                {q: h.copy() for q, h in self._durations.items()},
                {q: h.copy() for q, h in self._ages.items()},
            )
