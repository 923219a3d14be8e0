"""Render what discovery and the coordination table say, for people (rich) and scripts (JSON).

`status` reads the table and, by default, only the queue *names* (ListQueues, one call per
1,000): at 10,000 queues that is ten SQS calls, not ten thousand. A listed queue without an
ownership row is either waiting to be claimed or a dead-letter queue (never claimed): one
ListDeadLetterSourceQueues per such queue tells them apart, so that a settled cluster costs
one call per dead-letter queue, made once per listing. Per-queue attributes (depth, redrive
policy: one GetQueueAttributes per queue, concurrent) only with `--details`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table

from sqsbalancerd.clock import Clock
from sqsbalancerd.coordination import loadsummary
from sqsbalancerd.coordination.membership import LivenessTracker
from sqsbalancerd.coordination.ring import capacity
from sqsbalancerd.coordination.table import CoordinationTable, OwnershipRecord
from sqsbalancerd.discovery import Discovery, DiscoveryResult, QueueInfo, queue_name_from_url

# Names quoted in the "no ownership row" warning; the JSON has them all.
_UNCLAIMED_NAMED = 5
# More queues without a row than this (a cluster not started yet) are not checked one by
# one for being dead-letter queues: that is what --details is for.
DEAD_LETTER_CHECK_MAX = 1000


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
    utilisation: float | None = None  # as its last load summary says (None: none)


@dataclass(frozen=True, slots=True)
class QueueView:
    queue: str  # a shared queue's replica rows are listed as <queue>#r<i> (replicas.py)
    queue_url: str
    owner: str | None
    load: float | None = None  # handler-s/s over its owners' summaries (busy queues only)
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
    # Listed queues without an ownership row: dead-letter queues of a listed queue, and
    # those not checked (too many, or the check failed). The others wait to be claimed.
    dead_letter: frozenset[str] = frozenset()
    unchecked: frozenset[str] = frozenset()


class QueueSource:
    """The queues for `status`: listed again only every `relist_s` (so `--watch` does not
    list every refresh); attributes read only when `is_detailed`, concurrently. Whether a
    queue without a row is a dead-letter queue is asked once per listing."""

    def __init__(
        self, discovery: Discovery, *, clock: Clock, relist_s: float, is_detailed: bool
    ) -> None:
        self._discovery = discovery
        self._clock = clock
        self._relist_s = relist_s
        self.is_detailed = is_detailed
        self._candidates: dict[str, str] | None = None
        self._listed_at_s = 0.0
        self._is_dead_letter: dict[str, bool | None] = {}  # name -> verdict, this listing

    def snapshot(self, *, claimed: Collection[str]) -> QueueSnapshot:
        """`claimed`: the queues with an ownership row, which need no dead-letter check."""
        now_s = self._clock.monotonic()
        if self._candidates is None or now_s - self._listed_at_s >= self._relist_s:
            self._candidates = self._discovery.candidates()
            self._listed_at_s = now_s
            self._is_dead_letter = {}
        if self.is_detailed:
            return QueueSnapshot(discovered=self._discovery.classify(self._candidates).matched)
        listed = sorted(
            (queue_name_from_url(url), url)
            for url, origin in self._candidates.items()
            if self._discovery.filter_reason(queue_name_from_url(url), origin) is None
        )
        rowless = [(name, url) for name, url in listed if name not in claimed]
        if not self._discovery.skips_dead_letter_queues:
            return QueueSnapshot(listed=tuple(listed))  # every rowless queue is to be claimed
        self._check_dead_letter(rowless, listed_names={name for name, _ in listed})
        verdicts = [(name, self._is_dead_letter.get(name)) for name, _ in rowless]
        return QueueSnapshot(
            listed=tuple(listed),
            dead_letter=frozenset(name for name, verdict in verdicts if verdict),
            unchecked=frozenset(name for name, verdict in verdicts if verdict is None),
        )

    def _check_dead_letter(self, rowless: list[tuple[str, str]], *, listed_names: set[str]) -> None:
        """A dead-letter queue, as discovery judges: the target of a listed queue's policy."""
        due = [(name, url) for name, url in rowless if name not in self._is_dead_letter]
        if not due or len(due) > DEAD_LETTER_CHECK_MAX:
            return
        sources = self._discovery.dead_letter_sources([url for _, url in due])
        for name, url in due:
            found = sources[url]
            self._is_dead_letter[name] = None if found is None else bool(found & listed_names)


@dataclass(frozen=True, slots=True)
class StatusReport:
    application: str
    table: str
    instances: tuple[InstanceView, ...]
    queues: tuple[QueueView, ...]
    warnings: tuple[str, ...]
    # Listed, matching, without an ownership row, not known to be dead-letter queues or not:
    # not counted against `all_owned`. Known ones are under `dead_letter` (never claimed)
    # or in `queues` with no owner.
    unclaimed: tuple[str, ...] = ()
    dead_letter: tuple[str, ...] = ()

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
                "dead_letter": list(self.dead_letter),
                "warnings": list(self.warnings),
                "all_owned": self.is_all_owned,
            }
        )


class StatusReader:
    """One observer like any other: liveness by heartbeat counters on our own clock.

    A one-shot read looks at the member rows twice, `heartbeat_interval`·1.25 apart: an
    instance is alive if its counter moved in between (every live instance renews once
    per interval), or if it renewed within `heartbeat_timeout` by its own timestamp: one
    renewal late (a slow table) is not dead to the cluster, so not to `status` either. The
    timestamp is the instance's clock, so a skewed one shifts that by the skew, never past
    `heartbeat_timeout` into the future. `--watch` keeps observing, so it applies the full
    timeout rule on our own clock.
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
        self._timeout_s = heartbeat_timeout_s
        self._first: dict[str, int] = {}
        self._liveness = LivenessTracker(clock, timeout_s=heartbeat_timeout_s)
        self._watched_s = 0.0

    def read_once(self, wait: Callable[[float], object]) -> dict[str, bool]:
        first = {m.instance_id: m.counter for m in self._table.members()}
        wait(self._interval_s * 1.25)
        second = self._table.members()
        self._liveness.observe(second)
        now_wall = self._clock.wall()
        return {
            m.instance_id: first.get(m.instance_id, -1) != m.counter
            or abs(now_wall - m.heartbeat_at) < self._timeout_s
            for m in second
        }

    def read_watching(self) -> dict[str, bool]:
        members = self._table.members()
        self._liveness.observe(members)
        return {m.instance_id: self._liveness.is_alive(m.instance_id) for m in members}

    def ownership(self) -> dict[str, OwnershipRecord]:
        return self._table.ownership()

    def report(
        self,
        alive: dict[str, bool],
        snapshot: QueueSnapshot,
        *,
        rows: dict[str, OwnershipRecord] | None = None,
    ) -> StatusReport:
        """`rows`: the ownership rows if already read this refresh."""
        members = {m.instance_id: m for m in self._liveness.records()}
        rows = self._table.ownership() if rows is None else rows
        now_wall = self._clock.wall()
        if snapshot.discovered is not None:
            queues = _queue_views(rows, list(snapshot.discovered))
        else:
            queues = _listed_views(rows, snapshot)
        summaries = {m.instance_id: loadsummary.decode(m.load) for m in members.values() if m.load}
        loads = loadsummary.queue_loads(summaries.values())
        queues = tuple(
            replace(v, load=loads[v.queue].handler_s_per_s) if v.queue in loads else v
            for v in queues
        )
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
                utilisation=(
                    summaries[m.instance_id].utilisation if m.instance_id in summaries else None
                ),
            )
            for m in sorted(members.values(), key=lambda m: m.instance_id)
        )
        return StatusReport(
            application=self._table.application,
            table=self._table.table_name,
            instances=instances,
            queues=queues,
            warnings=_warnings(instances, queues, self._load_factor)
            + _unclaimed(tuple(sorted(snapshot.unchecked))),
            unclaimed=tuple(sorted(snapshot.unchecked)),
            dead_letter=tuple(sorted(snapshot.dead_letter)),
        )


def read_report(reader: StatusReader, source: QueueSource, alive: dict[str, bool]) -> StatusReport:
    """One refresh: the ownership rows once, then the queues they leave out."""
    rows = reader.ownership()
    return reader.report(alive, source.snapshot(claimed=rows.keys()), rows=rows)


def watch(
    reader: StatusReader,
    source: QueueSource,
    *,
    every_s: float,
    show: Callable[[StatusReport], None],
    wait: Callable[[float], bool],
) -> None:
    """`status --watch`: a report every `every_s` until `wait` says stop. Each refresh
    reads the member and ownership rows; the queues are listed again only as `source` says."""
    while True:
        show(read_report(reader, source, reader.read_watching()))
        if wait(every_s):
            return


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
    rows: dict[str, OwnershipRecord], snapshot: QueueSnapshot
) -> tuple[QueueView, ...]:
    """By name only: owned rows, released rows of queues that still exist, and listed
    queues without a row that are known not to be dead-letter queues (no owner yet)."""
    urls = dict(snapshot.listed)
    set_aside = snapshot.dead_letter | snapshot.unchecked
    names = {name for name, row in rows.items() if row.owner or name in urls}
    names |= {name for name in urls if name not in rows and name not in set_aside}
    return tuple(
        QueueView(
            name, urls.get(name) or rows[name].queue_url, rows[name].owner if name in rows else None
        )
        for name in sorted(names)
    )


def _unclaimed(unclaimed: tuple[str, ...]) -> tuple[str, ...]:
    if not unclaimed:
        return ()
    shown = ", ".join(unclaimed[:_UNCLAIMED_NAMED]) + (
        " ..." if len(unclaimed) > _UNCLAIMED_NAMED else ""
    )
    return (
        f"{len(unclaimed)} matching queues have no ownership row ({shown}) and were not checked "
        "for being dead-letter queues (which are never claimed); --details tells them apart",
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
    columns = (
        "instance",
        "host",
        "status",
        "alive",
        "heartbeat age s",
        "queues",
        "busy",
        "started",
    )
    for column in columns:
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
            "" if i.utilisation is None else f"{i.utilisation:.0%}",
            started,
        )
    console.print(instances)
    console.print(_queue_table(report.queues, is_detailed=is_detailed))
    if report.dead_letter:
        shown = ", ".join(report.dead_letter[:_UNCLAIMED_NAMED])
        more = " ..." if len(report.dead_letter) > _UNCLAIMED_NAMED else ""
        console.print(f"{len(report.dead_letter)} dead-letter queues, never claimed: {shown}{more}")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


def _queue_table(views: tuple[QueueView, ...], *, is_detailed: bool) -> Table:
    table = Table(title="queues")
    table.add_column("queue")
    table.add_column("owner")
    table.add_column("load", justify="right")
    if is_detailed:
        for column in ("messages", "in flight"):
            table.add_column(column, justify="right")
        table.add_column("redrive")
    for q in views:
        load = "" if q.load is None else f"{q.load:.2f}"
        cells = [q.queue, q.owner or "[red]none[/]", load]
        if is_detailed:
            cells += [_cell(q.messages), _cell(q.messages_in_flight), _yes_no(q.has_redrive_policy)]
        table.add_row(*cells)
    return table


def _cell(value: int | None) -> str:
    return "" if value is None else str(value)


def _yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "no")
