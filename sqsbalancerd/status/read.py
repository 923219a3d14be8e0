"""Read what `status` shows: the member and ownership rows, and the queues (see __init__)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import replace

from sqsbalancerd.clock import Clock
from sqsbalancerd.coordination import loadsummary
from sqsbalancerd.coordination.membership import LivenessTracker
from sqsbalancerd.coordination.table import CoordinationTable, OwnershipRecord
from sqsbalancerd.discovery import Discovery, queue_name_from_url
from sqsbalancerd.status.report import (
    InstanceView,
    QueueSnapshot,
    StatusReport,
    listed_views,
    queue_views,
    unclaimed_warning,
    warnings_for,
)

# More queues without a row than this (a cluster not started yet) are not checked one by
# one for being dead-letter queues: that is what --details is for.
DEAD_LETTER_CHECK_MAX = 1000


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
            queues = queue_views(rows, list(snapshot.discovered))
        else:
            queues = listed_views(rows, snapshot)
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
                idling_queues=m.idling_queues,
                sqs_requests_per_hour=m.sqs_requests_per_hour,
            )
            for m in sorted(members.values(), key=lambda m: m.instance_id)
        )
        return StatusReport(
            application=self._table.application,
            table=self._table.table_name,
            instances=instances,
            queues=queues,
            warnings=warnings_for(instances, queues, self._load_factor)
            + unclaimed_warning(tuple(sorted(snapshot.unchecked))),
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
