"""Render what discovery and the coordination table say, for people (rich) and scripts (JSON).

`status` reads the table and, by default, only the queue *names* (ListQueues, one call per
1,000): at 10,000 queues that is ten SQS calls, not ten thousand. Per-queue attributes
(depth, redrive policy: one GetQueueAttributes per queue, concurrent) only with `--details`.
"""

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
from sqsbalancerd.discovery import Discovery, DiscoveryResult, QueueInfo, queue_name_from_url

# Names quoted in the "no ownership row" warning; the JSON has them all.
_UNCLAIMED_NAMED = 5


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
    # --details only: as GetQueueAttributes answered
    messages: int | None = None
    messages_in_flight: int | None = None
    has_redrive_policy: bool | None = None


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """What `status` knows of the queues besides the table: names matching the pattern
    (attributes unread), or, with `--details`, discovery's result with attributes."""

    listed: tuple[tuple[str, str], ...] = ()  # (name, url)
    discovered: tuple[QueueInfo, ...] | None = None


class QueueSource:
    """The queues for `status`: listed again only every `relist_s` (so `--watch` does not
    list every refresh); attributes read only when `is_detailed`, concurrently."""

    def __init__(
        self, discovery: Discovery, *, clock: Clock, relist_s: float, is_detailed: bool
    ) -> None:
        self._discovery = discovery
        self._clock = clock
        self._relist_s = relist_s
        self.is_detailed = is_detailed
        self._candidates: dict[str, str] | None = None
        self._listed_at_s = 0.0

    def snapshot(self) -> QueueSnapshot:
        now_s = self._clock.monotonic()
        if self._candidates is None or now_s - self._listed_at_s >= self._relist_s:
            self._candidates = self._discovery.candidates()
            self._listed_at_s = now_s
        if self.is_detailed:
            return QueueSnapshot(discovered=self._discovery.classify(self._candidates).matched)
        listed = [
            (queue_name_from_url(url), url)
            for url, origin in self._candidates.items()
            if self._discovery.filter_reason(queue_name_from_url(url), origin) is None
        ]
        return QueueSnapshot(listed=tuple(sorted(listed)))


@dataclass(frozen=True, slots=True)
class StatusReport:
    application: str
    table: str
    instances: tuple[InstanceView, ...]
    queues: tuple[QueueView, ...]
    warnings: tuple[str, ...]
    # Listed, matching, without an ownership row: new, or dead-letter queues (never claimed),
    # which only --details tells apart. Not counted against `all_owned`.
    unclaimed: tuple[str, ...] = ()

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
                "unclaimed": list(self.unclaimed),
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

    def report(self, alive: dict[str, bool], snapshot: QueueSnapshot) -> StatusReport:
        members = {m.instance_id: m for m in self._liveness.records()}
        rows = self._table.ownership()
        now_wall = self._clock.wall()
        unclaimed: tuple[str, ...] = ()
        if snapshot.discovered is not None:
            queues = _queue_views(rows, list(snapshot.discovered))
        else:
            queues = _listed_views(rows, snapshot.listed)
            unclaimed = tuple(name for name, _ in snapshot.listed if name not in rows)
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
            warnings=_warnings(instances, queues, self._load_factor) + _unclaimed(unclaimed),
            unclaimed=unclaimed,
        )


def _queue_views(
    rows: dict[str, OwnershipRecord], discovered: list[QueueInfo]
) -> tuple[QueueView, ...]:
    """--details: every queue discovery consumes, with attributes, plus every owned row."""
    infos = {q.name: q for q in discovered}
    names = sorted(set(infos) | {name for name, row in rows.items() if row.owner})
    return tuple(_view(name, rows.get(name), infos.get(name)) for name in names)


def _view(name: str, row: OwnershipRecord | None, info: QueueInfo | None) -> QueueView:
    if info is None:
        return QueueView(name, row.queue_url if row else "", row.owner if row else None)
    return QueueView(
        queue=name,
        queue_url=info.url,
        owner=row.owner if row else None,
        messages=info.approximate_messages,
        messages_in_flight=info.approximate_messages_in_flight,
        has_redrive_policy=info.has_redrive_policy,
    )


def _listed_views(
    rows: dict[str, OwnershipRecord], listed: tuple[tuple[str, str], ...]
) -> tuple[QueueView, ...]:
    """By name only: owned rows, and released rows of queues that still exist."""
    urls = dict(listed)
    names = sorted(name for name, row in rows.items() if row.owner or name in urls)
    return tuple(
        QueueView(name, urls.get(name) or rows[name].queue_url, rows[name].owner) for name in names
    )


def _unclaimed(unclaimed: tuple[str, ...]) -> tuple[str, ...]:
    if not unclaimed:
        return ()
    shown = ", ".join(unclaimed[:_UNCLAIMED_NAMED]) + (
        " ..." if len(unclaimed) > _UNCLAIMED_NAMED else ""
    )
    return (
        f"{len(unclaimed)} matching queues have no ownership row ({shown}): new, or dead-letter "
        "queues, which are never claimed; --details tells them apart",
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


def render_status(
    report: StatusReport, console: Console | None = None, *, is_detailed: bool = False
) -> None:
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
    console.print(_queue_table(report.queues, is_detailed=is_detailed))
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


def _queue_table(views: tuple[QueueView, ...], *, is_detailed: bool) -> Table:
    table = Table(title="queues")
    table.add_column("queue")
    table.add_column("owner")
    if is_detailed:
        for column in ("messages", "in flight"):
            table.add_column(column, justify="right")
        table.add_column("redrive")
    for q in views:
        cells = [q.queue, q.owner or "[red]none[/]"]
        if is_detailed:
            cells += [_cell(q.messages), _cell(q.messages_in_flight), _yes_no(q.has_redrive_policy)]
        table.add_row(*cells)
    return table


def _cell(value: int | None) -> str:
    return "" if value is None else str(value)


def _yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "no")
