from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sqsbalancerd.observability.metrics import (
    CONTENT_TYPE,
    BacklogGauge,
    build_registry,
    render,
)
from sqsbalancerd.stats import (
    QUEUE_COUNTERS,
    CoordinationStats,
    Histogram,
    QueueStats,
    StatsSnapshot,
)

P = "sqsbalancerd_"


def make_snapshot(**overrides: Any) -> StatsSnapshot:
    fields: dict[str, Any] = {
        "instance_id": "i-1",
        "owned_queues": ("orders", "refunds"),
        "queues": (
            QueueStats("orders", **{name: i + 1 for i, name in enumerate(QUEUE_COUNTERS)}),
            QueueStats("refunds", running=2, queued=7),
        ),
        "workers_busy": 3,
        "pool_size": 8,
        "stuck_slots": 1,
        "work_queue_depth": 9,
        "aws_calls": {
            ("sqs", "ReceiveMessage", "ok"): 40,
            ("sqs", "DeleteMessageBatch", "error"): 2,
        },
        "handler_duration": {},
        "message_age": {},
        "loop_ticks_age_s": {"poller:orders": 1.5},
        "aws_consecutive_failures": {"sqs": 2},
    }
    fields.update(overrides)
    return StatsSnapshot(**fields)


def registry_for(snapshot: StatsSnapshot, backlog: BacklogGauge | None = None) -> CollectorRegistry:
    return build_registry(lambda: snapshot, backlog)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(P + name, labels)


def test_message_counters_have_one_series_per_queue_and_outcome() -> None:
    registry = registry_for(make_snapshot())

    for i, outcome in enumerate(QUEUE_COUNTERS):
        assert value(registry, "messages_total", queue="orders", outcome=outcome) == i + 1
        assert value(registry, "messages_total", queue="refunds", outcome=outcome) == 0


def test_histogram_buckets_are_cumulative_with_inf_overflow() -> None:
    histogram = Histogram()
    for seconds in (0.001, 0.2, 0.3, 1000.0):
        histogram.observe(seconds)
    registry = registry_for(
        make_snapshot(handler_duration={"orders": histogram}, message_age={"refunds": histogram})
    )

    for name, queue in (("handler_duration_seconds", "orders"), ("message_age_seconds", "refunds")):
        expected = {"0.005": 1, "0.1": 1, "0.25": 2, "0.5": 3, "300.0": 3, "+Inf": 4}
        for bound, count in expected.items():
            assert value(registry, name + "_bucket", queue=queue, le=bound) == count, bound
        assert value(registry, name + "_count", queue=queue) == 4
        assert value(registry, name + "_sum", queue=queue) == pytest.approx(1000.501)


def test_process_and_queue_gauges() -> None:
    registry = registry_for(make_snapshot())

    assert value(registry, "in_flight", queue="refunds") == 2
    assert value(registry, "in_flight", queue="orders") == 0
    assert value(registry, "queued_messages", queue="refunds") == 7
    assert value(registry, "work_queue_depth") == 9
    assert value(registry, "workers_busy") == 3
    assert value(registry, "worker_pool_size") == 8
    assert value(registry, "stuck_slots") == 1
    assert value(registry, "owned_queues") == 2
    assert value(registry, "aws_consecutive_failures", service="sqs") == 2
    assert value(registry, "loop_tick_age_seconds", loop="poller:orders") == 1.5


def test_aws_calls_by_service_action_outcome() -> None:
    registry = registry_for(make_snapshot())

    assert (
        value(registry, "aws_calls_total", service="sqs", action="ReceiveMessage", outcome="ok")
        == 40
    )
    labels = {"service": "sqs", "action": "DeleteMessageBatch", "outcome": "error"}
    assert value(registry, "aws_calls_total", **labels) == 2


def test_coordination_metrics_only_when_coordinated() -> None:
    standalone = registry_for(make_snapshot())
    coordination = CoordinationStats(
        mode="dynamodb",
        is_registered=True,
        members_alive=3,
        heartbeat_age_s=4.5,
        rebalances=6,
        is_fenced=True,
    )
    coordinated = registry_for(make_snapshot(coordination=coordination))

    for name in ("heartbeat_age_seconds", "rebalances_total", "members_alive", "fenced"):
        assert value(standalone, name) is None, name
    assert value(coordinated, "heartbeat_age_seconds") == 4.5
    assert value(coordinated, "rebalances_total") == 6
    assert value(coordinated, "members_alive") == 3
    assert value(coordinated, "registered") == 1
    assert value(coordinated, "fenced") == 1

    not_yet = registry_for(
        make_snapshot(coordination=replace(coordination, heartbeat_age_s=None, is_fenced=False))
    )
    assert value(not_yet, "heartbeat_age_seconds") is None
    assert value(not_yet, "fenced") == 0
    assert value(not_yet, "unowned_queues") is None  # not counted yet: no series


def test_unowned_queues_are_exported_from_the_coordinators_view() -> None:
    coordination = CoordinationStats(
        mode="dynamodb",
        is_registered=True,
        members_alive=2,
        heartbeat_age_s=1.0,
        rebalances=0,
        is_fenced=False,
        unowned_queues=3,
    )
    registry = registry_for(make_snapshot(coordination=coordination))

    assert value(registry, "unowned_queues") == 3
    assert value(registry_for(make_snapshot()), "unowned_queues") is None


def test_each_scrape_reads_a_fresh_snapshot() -> None:
    snapshots = [make_snapshot(workers_busy=1)]
    calls: list[int] = []

    def source() -> StatsSnapshot:
        calls.append(1)
        return snapshots[-1]

    registry = build_registry(source, None)
    assert calls == []  # building registers only; the first read is the first scrape

    assert value(registry, "workers_busy") == 1
    snapshots.append(make_snapshot(workers_busy=5))
    assert value(registry, "workers_busy") == 5


def test_backlog_gauge_set_overwrite_and_forget() -> None:
    backlog = BacklogGauge()
    registry = registry_for(make_snapshot(), backlog)

    backlog.set("orders", visible=10, not_visible=3)
    backlog.set("refunds", visible=1, not_visible=0)
    backlog.set("orders", visible=12, not_visible=4)
    backlog.forget("refunds")
    backlog.forget("never-set")

    assert value(registry, "queue_backlog_messages", queue="orders", state="visible") == 12
    assert value(registry, "queue_backlog_messages", queue="orders", state="not_visible") == 4
    assert value(registry, "queue_backlog_messages", queue="refunds", state="visible") is None
    assert backlog.readings() == {"orders": (12, 4)}
    without = registry_for(make_snapshot())
    assert value(without, "queue_backlog_messages", queue="orders", state="visible") is None


def test_render_is_parseable_text_with_bounded_labels() -> None:
    histogram = Histogram()
    histogram.observe(0.2)
    backlog = BacklogGauge()
    backlog.set("orders", 1, 2)
    snapshot = make_snapshot(handler_duration={"orders": histogram})
    # Two registries in one process: neither touches the global default registry.
    first, second = registry_for(snapshot, backlog), registry_for(snapshot, backlog)

    body = render(first)

    assert body == render(second)
    assert "version=0.0.4" in CONTENT_TYPE
    assert b"# TYPE sqsbalancerd_messages_total counter" in body
    assert b"# TYPE sqsbalancerd_handler_duration_seconds histogram" in body
    families = list(text_string_to_metric_families(body.decode()))
    assert {f.name for f in families} >= {P + "messages", P + "queue_backlog_messages"}
    label_names = {name for f in families for sample in f.samples for name in sample.labels}
    assert label_names <= {"queue", "outcome", "service", "action", "loop", "state", "le"}


def test_load_gauges_only_once_a_load_summary_was_published() -> None:
    counting = CoordinationStats("dynamodb", True, 3, 1.0, 0, False)
    loaded = replace(
        counting, utilisation=0.75, queue_loads={"orders": 2.5}, replicas={"orders": 3}
    )
    assert value(registry_for(make_snapshot(coordination=counting)), "utilisation") is None
    registry = registry_for(make_snapshot(coordination=loaded))
    assert value(registry, "utilisation") == 0.75
    assert value(registry, "queue_load", queue="orders") == 2.5
    assert value(registry, "queue_owners", queue="orders") == 3
