"""The periodic sweep: compare the ownership rows with what this instance believes.

Outside a handoff nobody acts on the ownership rows, so without a sweep a row left free (a
release whose plan others did not share, a queue only some instances had discovered), a
row of a deleted queue, or a row naming us that we no longer hold would stay that way until
the next view change. Once every SWEEP_ROUNDS rounds, outside a handoff, the sweep looks at
our copy of the rows (kept fresh by the shard versions, rows.py) with the rows naming us
reread; `inspect` is pure, the coordinator acts on what it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from sqsbalancerd.coordination.table import OwnershipRecord

# Rounds between two sweeps (at the default interval: once a minute).
SWEEP_ROUNDS = 6


@dataclass(frozen=True, slots=True)
class SweepFindings:
    # Held by us, but the row names someone else or another lease: stop consuming.
    lost: frozenset[str] = frozenset()
    # Held by us, but the row is gone (deleted by hand): write it again, or stop.
    missing: frozenset[str] = frozenset()
    # Rows naming us that we do not hold (a lost answer to an acquire): adopt or release.
    adopt: Mapping[str, int] = field(default_factory=dict)
    disown: Mapping[str, int] = field(default_factory=dict)
    # Rows of queues nobody here knows, with no live owner: delete (conditional on lease).
    stale: Mapping[str, int] = field(default_factory=dict)
    # Rows naming us, not held, with a lease edited into nonsense: rewrite, then decide.
    repair: frozenset[str] = frozenset()
    # A queue we know has no live owner: plan again from the rows.
    needs_plan: bool = False


def check_held(
    row_of: Callable[[str], OwnershipRecord | None], *, me: str, held: Mapping[str, int]
) -> tuple[frozenset[str], frozenset[str]]:
    """(lost, missing) of what we hold: O(held), for the rounds that only guard holdings."""
    missing, lost = set(), set()
    for queue, lease in held.items():
        row = row_of(queue)
        # A row gone, or ours with a lease edited into nonsense: we write it again.
        if row is None or (row.owner == me and row.damaged_lease):
            missing.add(queue)
        elif (row.owner, row.lease) != (me, lease):
            lost.add(queue)
    return frozenset(lost), frozenset(missing)


def inspect(
    rows: Mapping[str, OwnershipRecord],
    *,
    me: str,
    held: Mapping[str, int],
    unreleased: Collection[str],
    wanted: Collection[str],
    known: Collection[str],
    members: Collection[str],
    is_dead: Callable[[str], bool],
) -> SweepFindings:
    lost, missing = check_held(rows.get, me=me, held=held)
    not_held = {q: row for q, row in rows.items() if row.owner == me and q not in held}
    repair = frozenset(q for q, row in not_held.items() if row.damaged_lease and q in known)
    ours = {
        q: row.lease for q, row in not_held.items() if q not in unreleased and not row.damaged_lease
    }
    adopt = {q: lease for q, lease in ours.items() if q in wanted and q in known}
    disown = {q: lease for q, lease in ours.items() if q not in adopt}
    stale = {
        q: row.lease
        for q, row in rows.items()
        if q not in known and row.owner != me and (row.owner is None or is_dead(row.owner))
    }
    needs_plan = any(q not in rows or rows[q].owner not in members for q in known if q not in held)
    return SweepFindings(lost, missing, adopt, disown, stale, repair, needs_plan)
