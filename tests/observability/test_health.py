from __future__ import annotations

import json
from typing import Any

import pytest

from sqsbalancerd.observability.health import HealthReport, liveness, readiness
from sqsbalancerd.stats import CoordinationStats, StatsSnapshot


def make_snapshot(**overrides: Any) -> StatsSnapshot:
    fields: dict[str, Any] = {
        "instance_id": "i-1",
        "owned_queues": ("orders",),
        "queues": (),
        "workers_busy": 0,
        "pool_size": 4,
        "stuck_slots": 0,
        "work_queue_depth": 0,
        "aws_calls": {},
        "handler_duration": {},
        "message_age": {},
        "loop_ticks_age_s": {"poller:orders": 2.0, "acks": 0.5},
        "aws_consecutive_failures": {"sqs": 0},
    }
    fields.update(overrides)
    return StatsSnapshot(**fields)


def coordination(**overrides: Any) -> CoordinationStats:
    fields: dict[str, Any] = {
        "mode": "dynamodb",
        "is_registered": True,
        "members_alive": 2,
        "heartbeat_age_s": 1.0,
        "rebalances": 0,
        "is_fenced": False,
    }
    fields.update(overrides)
    return CoordinationStats(**fields)


def test_liveness_ok_when_loops_tick_and_workers_free() -> None:
    report = liveness(make_snapshot(), max_loop_age_s=10)

    assert report == HealthReport(
        ok=True, checks={"loops": "ok", "workers": "ok", "event_loop": "ok"}
    )


def test_liveness_fails_when_the_handlers_event_loop_is_blocked_past_its_limit() -> None:
    within = liveness(
        make_snapshot(event_loop_lag_s=9.0, event_loop_lag_limit_s=10), max_loop_age_s=60
    )
    past = liveness(
        make_snapshot(event_loop_lag_s=11.0, event_loop_lag_limit_s=10), max_loop_age_s=60
    )
    assert within.ok
    assert not past.ok
    assert past.checks["event_loop"] == "async handlers' event loop blocked for 11.0s (limit 10s)"


def test_liveness_names_the_stale_loops() -> None:
    snapshot = make_snapshot(
        loop_ticks_age_s={"poller:orders": 31.0, "acks": 0.5, "heartbeat": 45.3}
    )

    report = liveness(snapshot, max_loop_age_s=30)

    assert not report.ok
    assert "heartbeat 45.3s" in report.checks["loops"]
    assert "poller:orders 31.0s" in report.checks["loops"]
    assert "acks" not in report.checks["loops"]
    assert report.checks["workers"] == "ok"


def test_loop_exactly_at_the_limit_is_alive() -> None:
    assert liveness(make_snapshot(loop_ticks_age_s={"acks": 30.0}), max_loop_age_s=30).ok


@pytest.mark.parametrize(
    ("stuck_slots", "pool_size", "is_ok"),
    [(0, 4, True), (3, 4, True), (4, 4, False), (0, 0, True)],
)
def test_liveness_fails_only_when_every_slot_is_stuck(
    stuck_slots: int, pool_size: int, is_ok: bool
) -> None:
    snapshot = make_snapshot(stuck_slots=stuck_slots, pool_size=pool_size)

    report = liveness(snapshot, max_loop_age_s=10)

    assert report.ok is is_ok
    assert (report.checks["workers"] == "ok") is is_ok


def test_readiness_standalone_is_ready() -> None:
    report = readiness(make_snapshot(coordination=None))

    assert report.ok
    assert report.checks == {
        "coordination": "ok",
        "aws": "ok",
        "loops": "ok",
        "workers": "ok",
        "event_loop": "ok",
    }


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (coordination(is_registered=False), "not registered"),
        (coordination(is_fenced=True), "fenced"),
    ],
    ids=["unregistered", "fenced"],
)
def test_readiness_needs_registration_and_no_fence(state: CoordinationStats, reason: str) -> None:
    assert readiness(make_snapshot(coordination=coordination())).ok

    report = readiness(make_snapshot(coordination=state))

    assert not report.ok
    assert report.checks["coordination"] == reason


def test_readiness_fails_at_the_aws_failure_streak() -> None:
    below = make_snapshot(aws_consecutive_failures={"sqs": 2, "dynamodb": 0})
    at_max = make_snapshot(aws_consecutive_failures={"sqs": 3, "dynamodb": 5})

    assert readiness(below, max_aws_failure_streak=3).ok
    report = readiness(at_max, max_aws_failure_streak=3)
    assert not report.ok
    assert "sqs 3" in report.checks["aws"]
    assert "dynamodb 5" in report.checks["aws"]
    assert readiness(at_max, max_aws_failure_streak=6).ok


def test_readiness_includes_liveness() -> None:
    stale = make_snapshot(loop_ticks_age_s={"acks": 20.0})

    assert readiness(stale, max_loop_age_s=30).ok
    report = readiness(stale, max_loop_age_s=10)
    assert not report.ok
    assert report.checks["loops"] != "ok"
    assert report.checks["coordination"] == "ok"


def test_to_json_round_trips() -> None:
    report = HealthReport(ok=False, checks={"loops": "no tick", "workers": "ok"})

    assert json.loads(report.to_json()) == {
        "ok": False,
        "checks": {"loops": "no tick", "workers": "ok"},
    }
