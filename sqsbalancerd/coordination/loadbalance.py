"""Load-aware assignment from the member rows, agreed without a shared clock.

Every instance must compute the same plan, so every input comes from rows, none from our
own clock or memory:

- **The planning epoch** is named by the lowest live member id (the "clock member") and
  its last heartbeat time rounded down to `load_interval`: ``"<id>:<n>"``. Everyone reads
  that row each round, so everyone sees the epoch turn within one round of each other.
- **Summaries** are measured once per epoch: a member that sees a new epoch publishes its
  summary tagged with it (at its next heartbeat) and leaves it alone until the next epoch.
  So a summary tagged E is the same for every reader.
- **An epoch is complete** when every member in our view has published for it. Only then
  do we plan by load, from a frozen `LoadContext` (the summaries, worker counts and join
  times as they were published, the epoch start as ``now``); members that joined later
  plan as newcomers with no load. Until a first epoch completes (or with `balance =
  "count"`, or peers that publish nothing) the count planner runs, as before.
- **History** (current owners; when each queue last moved: its row's `moved_at`, the
  epoch time its taker knew, else `updated_at`) is the ownership rows, which everyone reads.
  Join times are epoch times too (the first epoch a member published for), so a wall clock
  off by a day neither pins a queue nor keeps a member ramping.

Disagreement (two instances with different views or epochs for a round) can only make
plans differ, and plans grant nothing: a queue is consumed only after a conditional write
of its row (leases.py), given up only by draining first. A plan's moves that nobody follows
leave a free row, which the handoff's orphan rule and the sweep give an owner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqsbalancerd.coordination import loadsummary
from sqsbalancerd.coordination.loadplan import (
    MemberLoad,
    Move,
    Owners,
    PlanSettings,
    QueueLoad,
    plan,
)
from sqsbalancerd.coordination.replicas import base_of, holders, place
from sqsbalancerd.coordination.table import MemberRecord, OwnershipRecord


@dataclass(frozen=True, slots=True)
class Epoch:
    token: str
    now_s: float  # the epoch's start, on the clock member's wall clock


@dataclass(frozen=True, slots=True)
class LoadContext:
    """One complete epoch's published figures: what every instance plans from."""

    epoch: Epoch
    members: Mapping[str, MemberLoad]
    loads: Mapping[str, QueueLoad]
    median_workers: int


def epoch_of(
    members: tuple[str, ...], records: Mapping[str, MemberRecord], interval_s: float
) -> Epoch | None:
    """The planning epoch as the clock member's row says; None without one."""
    if not members or interval_s <= 0:
        return None
    clock = members[0]
    record = records.get(clock)
    if record is None or not math.isfinite(record.heartbeat_at):
        return None
    n = math.floor(record.heartbeat_at / interval_s)
    return Epoch(f"{clock}:{n}", n * interval_s)


def complete_context(
    epoch: Epoch, members: tuple[str, ...], records: Mapping[str, MemberRecord]
) -> LoadContext | None:
    """The epoch's figures once every member in the view published for it; else None."""
    published = [records.get(m) for m in members]
    if not members or any(r is None or r.load_epoch != epoch.token for r in published):
        return None
    rows = [r for r in published if r is not None]
    summaries = {r.instance_id: loadsummary.decode(r.load) for r in rows}
    member_loads = {
        r.instance_id: MemberLoad(
            workers=max(1, r.workers),
            utilisation=summaries[r.instance_id].utilisation,
            joined_at_s=r.load_joined,
            listed=sum(s.handler_s_per_s for s in summaries[r.instance_id].queues),
        )
        for r in rows
    }
    workers = sorted(m.workers for m in member_loads.values())
    return LoadContext(
        epoch=epoch,
        members=member_loads,
        loads=loadsummary.queue_loads(summaries[m] for m in sorted(summaries)),
        median_workers=workers[len(workers) // 2],
    )


@dataclass(frozen=True, slots=True)
class Assignment:
    owners: dict[str, str]  # slot (replicas.py) -> owner
    moves: tuple[Move, ...]
    replicas: Mapping[str, int] = field(default_factory=dict)  # queues with k > 1 owners


def assign(
    context: LoadContext,
    *,
    queues: tuple[str, ...],
    members: tuple[str, ...],
    rows: Mapping[str, OwnershipRecord],
    owners: Mapping[str, str],
    settings: PlanSettings,
) -> Assignment:
    """Each queue's owners by load, as slot -> owner (a hot queue has several slots).

    ``owners``: each slot's current owner (the rows, with what we hold).
    ``rows``: for each queue's last move (the latest of its slots')."""
    loads = {m: _member(context, m) for m in members}
    known = set(queues)
    ours = {s: o for s, o in owners.items() if base_of(s) in known}
    current: dict[str, Owners] = {q: tuple(sorted(h)) for q, h in holders(ours).items()}
    moved_at: dict[str, float] = {}
    for slot, row in rows.items():
        queue = base_of(slot)
        if row.owner and queue in known:
            moved_at[queue] = max(moved_at.get(queue, -math.inf), _moved_at(row))
    result = plan(
        queues,
        context.loads,
        loads,
        current,
        moved_at,
        now_s=context.epoch.now_s,
        settings=settings,
    )
    shared = {q: len(o) for q, o in result.owners.items() if len(o) > 1}
    return Assignment(place(result.owners, ours), result.moves, shared)


def _moved_at(row: OwnershipRecord) -> float:
    return row.updated_at if row.moved_at is None else row.moved_at


def _member(context: LoadContext, member: str) -> MemberLoad:
    """As published for the epoch; a member that joined since plans as a newcomer."""
    found = context.members.get(member)
    if found is not None:
        return found
    return MemberLoad(
        workers=context.median_workers,
        utilisation=0.0,
        joined_at_s=context.epoch.now_s,
        listed=0.0,
    )
