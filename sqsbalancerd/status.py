"""Render what discovery and the coordination table say, for people (rich) and scripts (JSON)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table

from sqsbalancerd.clock import Clock
from sqsbalancerd.coordination.membership import LivenessTracker
from sqsbalancerd.coordination.ring import capacity
from sqsbalancerd.coordination.table import CoordinationTable, OwnershipRecord
from sqsbalancerd.discovery import DiscoveryResult, QueueInfo


def render_discovery(result: DiscoveryResult, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"Queues: {len(result.matched)} consumed, {len(result.skipped)} skipped")
    table.add_column("queue")
    table.add_column("consumed")
    table.add_column("type / reason")
    table.add_column("visibility s", justify="right")
    table.add_column("redrive")
    for info in result.matched:
        table.add_row(
            info.name,
            "yes",
            "fifo" if info.is_fifo else "standard",
            str(info.visibility_timeout_s),
            "yes" if info.has_redrive_policy else "no",
        )
    for skipped in result.skipped:
        table.add_row(skipped.name, "no", skipped.reason, "", "")
    console.print(table)


@dataclass(frozen=True, slots=True)
class InstanceView:
    instance_id: str
    host: str
    status: str
    alive: bool
    heartbeat_age_seconds: float
    queues: tuple[str, ...]
    started_at: float
    protocol: int


@dataclass(frozen=True, slots=True)
class QueueView:
    queue: str
    queue_url: str
    owner: str | None


@dataclass(frozen=True, slots=True)
class StatusReport:
    application: str
    table: str
    instances: tuple[InstanceView, ...]
    queues: tuple[QueueView, ...]
    warnings: tuple[str, ...]

    @property
    def is_all_owned(self) -> bool:
        alive = {i.instance_id for i in self.instances if i.alive}
        return all(q.owner in alive for q in self.queues)

    def to_json(self) -> str:
        return json.dumps(
            {
                "application": self.application,
                "table": self.table,
                "instances": [
                    {
                        **asdict(i),
                        "queues": list(i.queues),
                        "heartbeat_age_seconds": round(i.heartbeat_age_seconds, 3),
                    }
                    for i in self.instances
                ],
                "queues": [asdict(q) for q in self.queues],
                "warnings": list(self.warnings),
                "all_owned": self.is_all_owned,
            }
        )


class StatusReader:
    """One observer like any other: liveness by heartbeat counters on our own clock.

    A one-shot read looks at the member rows twice, `heartbeat_interval`·1.25 apart: an
    instance is alive if its counter moved in between (every live instance renews once
    per interval). `--watch` keeps observing, so it applies the full timeout rule.
    """

    def __init__(
        self,
        table: CoordinationTable,
        *,
        clock: Clock,
        heartbeat_interval_s: float,
        heartbeat_timeout_s: float,
        load_factor: float = 1.10,
    ) -> None:
        self._table = table
        self._load_factor = load_factor
        self._clock = clock
        self._interval_s = heartbeat_interval_s
        self._first: dict[str, int] = {}
        self._liveness = LivenessTracker(clock, timeout_s=heartbeat_timeout_s)
        self._watched_s = 0.0

    def read_once(self, wait: Callable[[float], object]) -> dict[str, bool]:
        first = {m.instance_id: m.counter for m in self._table.members()}
        wait(self._interval_s * 1.25)
        second = self._table.members()
        self._liveness.observe(second)
        return {m.instance_id: first.get(m.instance_id, -1) != m.counter for m in second}

    def read_watching(self) -> dict[str, bool]:
        members = self._table.members()
        self._liveness.observe(members)
        return {m.instance_id: self._liveness.is_alive(m.instance_id) for m in members}

    def report(self, alive: dict[str, bool], discovered: list[QueueInfo]) -> StatusReport:
        members = {m.instance_id: m for m in self._liveness.records()}
        rows = self._table.ownership()
        now_wall = self._clock.wall()
        queues = _queue_views(rows, discovered)
        owned: dict[str, list[str]] = {}
        for view in queues:
            if view.owner:
                owned.setdefault(view.owner, []).append(view.queue)
        instances = tuple(
            InstanceView(
                instance_id=m.instance_id,
                host=m.host,
                status=m.status,
                alive=alive.get(m.instance_id, False),
                heartbeat_age_seconds=max(0.0, now_wall - m.heartbeat_at),
                queues=tuple(sorted(owned.get(m.instance_id, []))),
                started_at=m.started_at,
                protocol=m.protocol,
            )
            for m in sorted(members.values(), key=lambda m: m.instance_id)
        )
        return StatusReport(
            application=self._table.application,
            table=self._table.table_name,
            instances=instances,
            queues=queues,
            warnings=_warnings(instances, queues, self._load_factor),
        )


def _queue_views(
    rows: dict[str, OwnershipRecord], discovered: list[QueueInfo]
) -> tuple[QueueView, ...]:
    urls = {q.name: q.url for q in discovered}
    names = sorted(set(urls) | {name for name, row in rows.items() if row.owner})
    return tuple(
        QueueView(
            queue=name,
            queue_url=urls.get(name) or (rows[name].queue_url if name in rows else ""),
            owner=rows[name].owner if name in rows else None,
        )
        for name in names
    )


def _warnings(
    instances: tuple[InstanceView, ...], queues: tuple[QueueView, ...], load_factor: float
) -> tuple[str, ...]:
    alive = {i.instance_id for i in instances if i.alive}
    warnings = [f"queue {q.queue} has no owner" for q in queues if q.owner is None]
    warnings += [
        f"queue {q.queue} is owned by {q.owner}, which is not alive"
        for q in queues
        if q.owner is not None and q.owner not in alive
    ]
    warnings += [
        f"instance {i.instance_id} looks dead (stale record)" for i in instances if not i.alive
    ]
    active = [i for i in instances if i.alive and i.status == "active"]
    if active and queues:
        counts = [len(i.queues) for i in active]
        limit = capacity(queue_count=len(queues), member_count=len(active), load_factor=load_factor)
        if max(counts) > limit:
            warnings.append(
                f"imbalance: an instance owns {max(counts)} queues (capacity {limit} at "
                f"load_factor {load_factor:g})"
            )
    return tuple(warnings)


def render_status(report: StatusReport, console: Console | None = None) -> None:
    console = console or Console()
    instances = Table(title=f"{report.application}: instances (table {report.table})")
    for column in ("instance", "host", "status", "alive", "heartbeat age s", "queues", "started"):
        instances.add_column(column)
    for i in report.instances:
        started = datetime.fromtimestamp(i.started_at, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
        instances.add_row(
            i.instance_id,
            i.host,
            i.status,
            "[green]yes[/]" if i.alive else "[red]no[/]",
            f"{i.heartbeat_age_seconds:.1f}",
            str(len(i.queues)),
            started,
        )
    console.print(instances)
    queues = Table(title="queues")
    queues.add_column("queue")
    queues.add_column("owner")
    for q in report.queues:
        queues.add_row(q.queue, q.owner or "[red]none[/]")
    console.print(queues)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
