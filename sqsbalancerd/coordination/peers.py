"""The other instances, as the member rows show them: who is in the ring, and what is not.

A member counts in the ring while it is alive (membership.LivenessTracker), active, and
plans as we do: same protocol, same ring parameters (an instance planning otherwise is
logged once and left out). Alongside: whether every member reports our queue set (only then
may balance move a queue), which live instances run an older protocol (their ownership rows
live elsewhere, so we take nothing while one lives), and the latest heartbeat time anyone
recorded (our row's TTL counts from it, so no single wall clock can expire a live member).
"""

from __future__ import annotations

import logging

from sqsbalancerd.coordination.membership import LivenessTracker, Membership
from sqsbalancerd.coordination.table import (
    PROTOCOL_VERSION,
    ConditionFailed,
    CoordinationTable,
    MemberRecord,
)

logger = logging.getLogger(__name__)


class Peers:
    def __init__(
        self,
        table: CoordinationTable,
        liveness: LivenessTracker,
        membership: Membership,
        *,
        instance_id: str,
    ) -> None:
        self._table = table
        self.liveness = liveness
        self._membership = membership
        self._me = instance_id
        self._incompatible_seen: set[str] = set()
        self.agree = True  # every member in the ring reports our queue set
        self.older_alive: tuple[str, ...] = ()
        self.latest_wall_s = 0.0
        self._has_confirmed = False  # the latest observation was a consistent read
        self.records: dict[str, MemberRecord] = {}  # as last read (load summaries)

    def observe(self, *, is_draining: bool, consistent: bool = False) -> tuple[str, ...]:
        """Read the member rows; the members in the ring (us too, unless draining).

        Eventually consistent by default, at half the cost: a stale answer can only show
        an older counter, which delays a death verdict, or hide a row created or keep one
        deleted a moment ago, which delays a join or a leave. Acting on a death verdict
        never rests on it: the member delete is conditional on the counter we judged, and
        a dead owner's queue is taken only after `confirm_dead` read the rows consistently.
        """
        records = self._table.members(consistent=consistent)
        self._has_confirmed = consistent
        self.records = {r.instance_id: r for r in records}
        self.liveness.observe(records)
        self.latest_wall_s = max([self.latest_wall_s, *(r.heartbeat_at for r in records)])
        in_ring = [r for r in records if self._counts_in_ring(r, is_draining=is_draining)]
        members = {r.instance_id for r in in_ring}
        if not is_draining:
            members.add(self._me)
        self._note_older_protocols(records)
        mine = self._membership.queues_hash
        # "" is a member of a version that does not publish it: it cannot disagree.
        self.agree = all(r.queues_hash in ("", mine) for r in in_ring)
        return tuple(sorted(members))

    def confirm_dead(self, instance_id: str) -> bool:
        """Dead by a consistent read of the member rows (one per round, only when needed):
        a replica lagging longer than our timeout must not kill a live member."""
        if not self._has_confirmed:
            self.liveness.observe(self._table.members(consistent=True))
            self._has_confirmed = True
        return self.liveness.is_dead(instance_id)

    def remove_dead(self) -> bool:
        """Delete dead members' rows before taking their queues: the delete, conditional on
        the counter we judged, is what makes the judgement stick (a renewal after it fails).
        True when a judgement came from a stale read: look again before taking any queue."""
        has_moved = False
        for record in self.liveness.dead_records():
            if record.instance_id == self._me:
                continue
            try:
                self._table.delete_member(record.instance_id, observed_counter=record.counter)
                logger.warning("removed a dead instance", extra={"instance": record.instance_id})
            except ConditionFailed:
                has_moved = True  # it renewed since our read (or someone else removed it)
        return has_moved

    def _note_older_protocols(self, records: list[MemberRecord]) -> None:
        older = tuple(
            sorted(
                r.instance_id
                for r in records
                if r.protocol < PROTOCOL_VERSION
                and r.status == "active"
                and self.liveness.is_alive(r.instance_id)
            )
        )
        if older and not self.older_alive:
            logger.warning(
                "instances of an older protocol are alive; taking no queue until they leave",
                extra={"instances": list(older[:5]), "count": len(older)},
            )
        elif self.older_alive and not older:
            logger.info("no instance of an older protocol is left; taking queues")
        self.older_alive = older

    def _counts_in_ring(self, record: MemberRecord, *, is_draining: bool) -> bool:
        if record.protocol != PROTOCOL_VERSION:
            self._refuse_once(
                record,
                "instance with an incompatible protocol version; not sharing with it",
                protocol=record.protocol,
                ours=PROTOCOL_VERSION,
            )
            return False
        if record.ring and record.ring != self._membership.ring:
            self._refuse_once(
                record,
                "instance with other ring parameters (virtual_nodes/load_factor); "
                "not planning with it",
                ring=record.ring,
                ours=self._membership.ring,
            )
            return False
        if record.instance_id == self._me:
            return not is_draining
        return record.status == "active" and self.liveness.is_alive(record.instance_id)

    def _refuse_once(self, record: MemberRecord, message: str, **details: object) -> None:
        if record.instance_id not in self._incompatible_seen:
            self._incompatible_seen.add(record.instance_id)
            logger.error(message, extra={"instance": record.instance_id, **details})
