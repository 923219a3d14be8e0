"""Liveness and readiness judged from a `StatsSnapshot`; pure, never calls AWS.

Liveness asks "should this process be restarted?": a loop that stopped ticking, or every
worker slot stuck in a handler. Readiness asks "is this instance doing its job?": liveness,
plus registered and not fenced (when coordinated) and AWS answering.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqsbalancerd.stats import CoordinationStats, StatsSnapshot

OK = "ok"
# Used by readiness when the caller does not say; generous next to a 20 s long poll.
DEFAULT_MAX_LOOP_AGE_S = 60.0


@dataclass(frozen=True, slots=True)
class HealthReport:
    ok: bool
    checks: dict[str, str]  # check name -> "ok" or the reason it failed

    @classmethod
    def from_checks(cls, checks: dict[str, str]) -> HealthReport:
        return cls(ok=all(result == OK for result in checks.values()), checks=checks)

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, "checks": self.checks}, sort_keys=True)


def _check_loops(loop_ticks_age_s: dict[str, float], max_loop_age_s: float) -> str:
    stale = sorted((name, age) for name, age in loop_ticks_age_s.items() if age > max_loop_age_s)
    if not stale:
        return OK
    ages = ", ".join(f"{name} {age:.1f}s" for name, age in stale)
    return f"no tick within {max_loop_age_s:g}s: {ages}"


def _check_workers(stuck_slots: int, pool_size: int) -> str:
    # Some stuck slots leave the others working; only a fully stuck pool needs a restart.
    # No stuck slot is fine even with an empty pool (not started yet, or drained).
    if stuck_slots == 0 or stuck_slots < pool_size:
        return OK
    return f"all {pool_size} worker slots stuck ({stuck_slots} stuck)"


def _check_event_loop(lag_s: float | None, limit_s: float) -> str:
    if lag_s is None or lag_s <= limit_s:
        return OK
    return f"async handlers' event loop blocked for {lag_s:.1f}s (limit {limit_s:g}s)"


def _check_coordination(coordination: CoordinationStats | None) -> str:
    if coordination is None:
        return OK  # standalone: nothing to join
    if coordination.is_fenced:
        return "fenced"
    if not coordination.is_registered:
        return "not registered"
    return OK


def _check_aws(failure_streaks: dict[str, int], max_aws_failure_streak: int) -> str:
    failing = sorted(
        (service, streak)
        for service, streak in failure_streaks.items()
        if streak >= max_aws_failure_streak
    )
    if not failing:
        return OK
    streaks = ", ".join(f"{service} {streak}" for service, streak in failing)
    return f"consecutive failures >= {max_aws_failure_streak}: {streaks}"


def liveness(snapshot: StatsSnapshot, *, max_loop_age_s: float) -> HealthReport:
    """OK when every loop ticked within `max_loop_age_s` and not every worker slot is stuck."""
    return HealthReport.from_checks(
        {
            "loops": _check_loops(snapshot.loop_ticks_age_s, max_loop_age_s),
            "workers": _check_workers(snapshot.stuck_slots, snapshot.pool_size),
            "event_loop": _check_event_loop(
                snapshot.event_loop_lag_s, snapshot.event_loop_lag_limit_s
            ),
        }
    )


def readiness(
    snapshot: StatsSnapshot,
    *,
    max_aws_failure_streak: int = 3,
    max_loop_age_s: float = DEFAULT_MAX_LOOP_AGE_S,
) -> HealthReport:
    """Liveness, plus registered and unfenced, plus no AWS service failing repeatedly."""
    checks = {
        "coordination": _check_coordination(snapshot.coordination),
        "aws": _check_aws(snapshot.aws_consecutive_failures, max_aws_failure_streak),
    }
    checks.update(liveness(snapshot, max_loop_age_s=max_loop_age_s).checks)
    return HealthReport.from_checks(checks)
