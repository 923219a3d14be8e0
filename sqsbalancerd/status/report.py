"""What `status` reports, and how it is derived from the rows and the listed queues (pure)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from sqsbalancerd.coordination.ring import capacity
from sqsbalancerd.coordination.table import OwnershipRecord
from sqsbalancerd.discovery import QueueInfo

# Names quoted in the "no ownership row" warning; the JSON has them all.
UNCLAIMED_NAMED = 5


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
    # As its last heartbeat says (engine/idle.py; None: an older version)
    idling_queues: int | None = None
    sqs_requests_per_hour: float | None = None


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


def queue_views(
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


def listed_views(
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


def unclaimed_warning(unclaimed: tuple[str, ...]) -> tuple[str, ...]:
    if not unclaimed:
        return ()
    shown = ", ".join(unclaimed[:UNCLAIMED_NAMED]) + (
        " ..." if len(unclaimed) > UNCLAIMED_NAMED else ""
    )
    return (
        f"{len(unclaimed)} matching queues have no ownership row ({shown}) and were not checked "
        "for being dead-letter queues (which are never claimed); --details tells them apart",
    )


def warnings_for(
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
