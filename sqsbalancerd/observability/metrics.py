"""Prometheus exposition of `Stats` snapshots.

A custom collector reads one `StatsSnapshot` per scrape instead of keeping a second set of
prometheus_client counters on the hot path. Labels are bounded: queue names, outcomes, AWS
service/action names, loop names; never a message id.

Metric families (all prefixed `sqsbalancerd_`):

    messages_total{queue,outcome}          counter; outcome is one of stats.QUEUE_COUNTERS
    handler_duration_seconds{queue}        histogram (stats.HISTOGRAM_BUCKETS_S)
    message_age_seconds{queue}             histogram, age when received
    in_flight{queue}                       gauge, handlers running
    queued_messages{queue}                 gauge, received and waiting for a worker
    work_queue_depth, workers_busy, worker_pool_size, stuck_slots, owned_queues   gauges
    idling_queues, estimated_sqs_requests_per_hour    gauges (sqs.idle_latency, engine/idle.py)
    aws_calls_total{service,action,outcome}          counter
    aws_consecutive_failures{service}      gauge, failed calls since the last success
    loop_tick_age_seconds{loop}            gauge, time since each loop last ticked
    queue_backlog_messages{queue,state}    gauge, state is visible|not_visible (BacklogGauge)

and, only when the snapshot has coordination stats:

    heartbeat_age_seconds (omitted while unknown), rebalances_total, members_alive,
    registered (0/1), fenced (0/1), unowned_queues (known queues whose row names no live
    member, as this instance saw them last round; omitted until counted), and with
    load-aware planning (as last published):
    utilisation (busy worker fraction), queue_load{queue} (handler-s/s, busy queues only),
    queue_owners{queue} (owners of each queue shared among several)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from sqsbalancerd.stats import (
    HISTOGRAM_BUCKETS_S,
    QUEUE_COUNTERS,
    CoordinationStats,
    Histogram,
    StatsSnapshot,
)

PREFIX = "sqsbalancerd_"
# The classic text format generate_latest writes; spelled out because the library's
# CONTENT_TYPE_LATEST moved to version=1.0.0 while the body did not change.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

SnapshotSource = Callable[[], StatsSnapshot]


def _histogram_buckets(histogram: Histogram) -> list[tuple[str, float]]:
    """Prometheus buckets are cumulative; `Histogram.counts` are per bucket plus overflow."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(HISTOGRAM_BUCKETS_S, histogram.counts, strict=False):
        running += count
        buckets.append((str(float(bound)), float(running)))
    buckets.append(("+Inf", float(sum(histogram.counts))))
    return buckets


def _histogram_family(
    name: str, documentation: str, histograms: dict[str, Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(PREFIX + name, documentation, labels=["queue"])
    for queue, histogram in sorted(histograms.items()):
        family.add_metric([queue], _histogram_buckets(histogram), sum_value=histogram.total)
    return family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


def _labelled_gauge(
    name: str, documentation: str, label: str, values: dict[str, float]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _queue_families(snapshot: StatsSnapshot) -> Iterator[Metric]:
    messages = CounterMetricFamily(
        PREFIX + "messages", "Messages by queue and outcome.", labels=["queue", "outcome"]
    )
    for stats in snapshot.queues:
        for outcome in QUEUE_COUNTERS:
            messages.add_metric([stats.queue, outcome], getattr(stats, outcome))
    yield messages
    running = {q.queue: float(q.running) for q in snapshot.queues}
    yield _labelled_gauge("in_flight", "Handlers running, per queue.", "queue", running)
    queued = {q.queue: float(q.queued) for q in snapshot.queues}
    yield _labelled_gauge(
        "queued_messages", "Received messages waiting for a worker.", "queue", queued
    )
    yield _histogram_family(
        "handler_duration_seconds", "Handler run time.", snapshot.handler_duration
    )
    yield _histogram_family(
        "message_age_seconds", "Message age when received.", snapshot.message_age
    )


def _process_families(snapshot: StatsSnapshot) -> Iterator[Metric]:
    yield _gauge("work_queue_depth", "Messages waiting for a worker.", snapshot.work_queue_depth)
    yield _gauge("workers_busy", "Worker slots running a handler.", snapshot.workers_busy)
    yield _gauge("worker_pool_size", "Worker slots.", snapshot.pool_size)
    yield _gauge("stuck_slots", "Worker slots past their handler deadline.", snapshot.stuck_slots)
    yield _gauge("owned_queues", "Queues this instance consumes.", len(snapshot.owned_queues))
    yield _gauge(
        "idling_queues",
        "Owned queues whose long polls are spaced out (sqs.idle_latency).",
        snapshot.idling_queues,
    )
    yield _gauge(
        "estimated_sqs_requests_per_hour",
        "ReceiveMessage calls an hour the owned queues cost while no message arrives.",
        snapshot.estimated_sqs_requests_per_hour,
    )
    if snapshot.event_loop_lag_s is not None:
        yield _gauge(
            "event_loop_lag_seconds",
            "How long the async handlers' event loop has been blocked.",
            snapshot.event_loop_lag_s,
        )
    calls = CounterMetricFamily(
        PREFIX + "aws_calls", "AWS API calls.", labels=["service", "action", "outcome"]
    )
    for (service, action, outcome), count in sorted(snapshot.aws_calls.items()):
        calls.add_metric([service, action, outcome], count)
    yield calls
    streaks = {s: float(n) for s, n in snapshot.aws_consecutive_failures.items()}
    yield _labelled_gauge(
        "aws_consecutive_failures", "Failed AWS calls since the last success.", "service", streaks
    )
    yield _labelled_gauge(
        "loop_tick_age_seconds",
        "Time since each loop last ticked.",
        "loop",
        dict(snapshot.loop_ticks_age_s),
    )


def _coordination_families(coordination: CoordinationStats) -> Iterator[Metric]:
    if coordination.heartbeat_age_s is not None:
        yield _gauge(
            "heartbeat_age_seconds", "Time since the last heartbeat.", coordination.heartbeat_age_s
        )
    yield CounterMetricFamily(
        PREFIX + "rebalances", "Ownership changes applied.", value=coordination.rebalances
    )
    yield _gauge("members_alive", "Live members seen in the table.", coordination.members_alive)
    yield _gauge("registered", "1 when registered as a member.", int(coordination.is_registered))
    yield _gauge("fenced", "1 when fenced off by the table.", int(coordination.is_fenced))
    if coordination.unowned_queues is not None:
        yield _gauge(
            "unowned_queues",
            "Known queues whose ownership row names no live member (this instance's view).",
            coordination.unowned_queues,
        )
    if coordination.utilisation is not None:
        yield _gauge(
            "utilisation", "Busy worker fraction, as last published.", coordination.utilisation
        )
        yield _labelled_gauge(
            "queue_load",
            "Handler-seconds per second spent on a queue, as last published.",
            "queue",
            dict(coordination.queue_loads),
        )
        yield _labelled_gauge(
            "queue_owners",
            "Owners of a queue shared among several (replica rows).",
            "queue",
            {q: float(k) for q, k in coordination.replicas.items()},
        )


class SnapshotCollector:
    """Reads a fresh snapshot at each scrape and yields the families listed above."""

    def __init__(self, snapshot: SnapshotSource) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        yield from _queue_families(snapshot)
        yield from _process_families(snapshot)
        if snapshot.coordination is not None:
            yield from _coordination_families(snapshot.coordination)


class BacklogGauge:
    """Latest ApproximateNumberOfMessages(/NotVisible) per queue, set by whoever polls them.

    The values come from GetQueueAttributes calls made elsewhere; a scrape never calls AWS.
    """

    STATES: Sequence[str] = ("visible", "not_visible")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, int]] = {}

    def set(self, queue: str, visible: int, not_visible: int) -> None:
        with self._lock:
            self._counts[queue] = (visible, not_visible)

    def forget(self, queue: str) -> None:
        """Stop exporting `queue` (no longer owned, or deleted)."""
        with self._lock:
            self._counts.pop(queue, None)

    def readings(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            return dict(self._counts)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            PREFIX + "queue_backlog_messages",
            "Approximate messages in the queue, by visibility.",
            labels=["queue", "state"],
        )
        for queue, counts in sorted(self.readings().items()):
            for state, count in zip(self.STATES, counts, strict=True):
                family.add_metric([queue, state], count)
        yield family


def build_registry(snapshot: SnapshotSource, backlog: BacklogGauge | None) -> CollectorRegistry:
    """A fresh registry (not the global default) exporting `snapshot` and `backlog`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    if backlog is not None:
        registry.register(backlog)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the text format named by `CONTENT_TYPE`."""
    return generate_latest(registry)
