"""Join, heartbeat, leave; and which members are alive, judged on this observer's clock.

Liveness follows the heartbeat counter, not the recorded wall-clock time: a member is
alive while its counter keeps changing within `heartbeat_timeout` of *our* monotonic
clock, so skew between hosts can neither kill nor resurrect anyone.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqsbalancerd.clock import Clock
from sqsbalancerd.coordination.table import (
    PROTOCOL_VERSION,
    ConditionFailed,
    CoordinationTable,
    MemberRecord,
)
from sqsbalancerd.errors import DuplicateInstanceError

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Seen:
    record: MemberRecord
    changed_at_s: float
    has_row: bool = True


class LivenessTracker:
    """Death verdicts that can only come late, never early.

    - A vanished row (deleted by hand, by TTL, by a peer) is not dead at once: it dies a
      full timeout after its last observed change, like a row that stopped moving.
    - An observer that could not read for longer than `blind_after_s` restarts every
      peer's clock: a DynamoDB outage stopped their renewals and our reads alike, and
      counting our blind period against them would evict the whole fleet. Only a read
      that failed (`note_missed_read`) makes a gap blind: a round merely slow (many
      acquires, a throttled write retried) saw every change the next read shows.
    - An owner never seen at all is dead a timeout after we first asked about it.
    """

    def __init__(
        self, clock: Clock, *, timeout_s: float, blind_after_s: float | None = None
    ) -> None:
        self._clock = clock
        self._timeout_s = timeout_s
        self._blind_after_s = blind_after_s
        self._seen: dict[str, _Seen] = {}
        self._asked_s: dict[str, float] = {}  # never seen: when we first asked
        self._observed_s: float | None = None
        self._has_missed_read = False

    def note_missed_read(self) -> None:
        """A round could not read the member rows (DynamoDB failed us)."""
        self._has_missed_read = True

    def observe(self, records: Iterable[MemberRecord]) -> None:
        now = self._clock.monotonic()
        if self._has_missed_read and self._is_blind_since_last(now):
            self._restart_clocks(now)
        self._observed_s = now
        self._has_missed_read = False
        current = {r.instance_id: r for r in records}
        for instance_id, record in current.items():
            seen = self._seen.get(instance_id)
            if seen is None or seen.record.counter != record.counter or not seen.has_row:
                # First sight (or a row back) counts as a change: a full timeout from now.
                self._seen[instance_id] = _Seen(record, now)
            else:
                seen.record = record
        for instance_id, seen in list(self._seen.items()):
            if instance_id not in current:
                seen.has_row = False
                if now - seen.changed_at_s >= 10 * self._timeout_s:
                    del self._seen[instance_id]  # long dead; forgetting it only delays

    def _is_blind_since_last(self, now: float) -> bool:
        last, limit = self._observed_s, self._blind_after_s
        return last is not None and limit is not None and now - last > limit

    def _restart_clocks(self, now: float) -> None:
        for seen in self._seen.values():
            seen.changed_at_s = now
        self._asked_s = dict.fromkeys(self._asked_s, now)

    def is_alive(self, instance_id: str) -> bool:
        seen = self._seen.get(instance_id)
        if seen is None or not seen.has_row:
            return False  # out of the ring (but not dead: see is_dead)
        return self._clock.monotonic() - seen.changed_at_s < self._timeout_s

    def is_dead(self, instance_id: str) -> bool:
        """Safe to take its queues: no counter change (or no row) for a whole timeout."""
        now = self._clock.monotonic()
        seen = self._seen.get(instance_id)
        since = seen.changed_at_s if seen else self._asked_s.setdefault(instance_id, now)
        return now - since >= self._timeout_s

    def records(self) -> list[MemberRecord]:
        return [s.record for s in self._seen.values() if s.has_row]

    def dead_records(self) -> list[MemberRecord]:
        """Dead members whose rows are still there (to delete, conditional on the counter)."""
        return [
            s.record
            for s in self._seen.values()
            if s.has_row and self.is_dead(s.record.instance_id)
        ]


class Membership:
    """This instance's own row: registration (never stealing a live id), heartbeat, leave."""

    def __init__(
        self,
        table: CoordinationTable,
        *,
        instance_id: str,
        clock: Clock,
        heartbeat_interval_s: float,
        heartbeat_timeout_s: float,
        ring: str = "",
    ) -> None:
        self._table = table
        self.instance_id = instance_id
        self._clock = clock
        self._interval_s = heartbeat_interval_s
        self._timeout_s = heartbeat_timeout_s
        self.epoch = uuid.uuid4().hex
        self.status = "active"
        self.counter = 0
        self.is_registered = False
        self.ring = ring  # published: peers refuse to plan with different ring parameters
        self.queues_hash = ""  # published: balance moves wait until every member agrees
        # (planning epoch, load summary, workers, joined): published at the next heartbeat.
        self.pending_load: tuple[str, str, int, float] | None = None
        # (queues idling, SQS requests an hour): sent with every heartbeat, for `status`.
        self.idle_source: Callable[[], tuple[int, float]] | None = None

    def _record(self, counter: int) -> MemberRecord:
        now = self._clock.wall()
        return MemberRecord(
            instance_id=self.instance_id,
            host=socket.gethostname(),
            status=self.status,
            counter=counter,
            epoch=self.epoch,
            protocol=PROTOCOL_VERSION,
            heartbeat_at=now,
            started_at=now,
            ring=self.ring,
            queues_hash=self.queues_hash,
        )

    def join(self, wait: Callable[[float], bool]) -> None:
        """Register. If the id exists, watch its counter for a timeout: moving → refuse."""
        try:
            self._table.create_member(self._record(1))
            self.counter = 1
        except ConditionFailed:
            self._take_over_if_dead(wait)
        self.is_registered = True

    def _take_over_if_dead(self, wait: Callable[[float], bool]) -> None:
        existing = self._table.get_member(self.instance_id)
        if existing is None:
            return self.join(wait)
        logger.warning(
            "instance id already registered; watching its heartbeat before taking it over",
            extra={"instance": self.instance_id, "timeout_s": self._timeout_s},
        )
        deadline = self._clock.monotonic() + self._timeout_s
        while self._clock.monotonic() < deadline:
            if wait(min(self._interval_s / 2, max(0.0, deadline - self._clock.monotonic()))):
                raise DuplicateInstanceError("stopped while checking the instance id")
            current = self._table.get_member(self.instance_id)
            if current is None:
                return self.join(wait)  # it left (or was removed as dead): register afresh
            if current.counter != existing.counter:
                raise DuplicateInstanceError(_duplicate_message(self.instance_id))
        try:
            self._table.take_over_member(
                self._record(existing.counter + 1), observed_counter=existing.counter
            )
        except ConditionFailed:
            raise DuplicateInstanceError(_duplicate_message(self.instance_id)) from None
        self.counter = existing.counter + 1
        return None

    def heartbeat(self, *, ttl_floor_wall: float = 0.0) -> None:
        """Advance our counter. The row's TTL counts from the latest wall clock among the
        members (`ttl_floor_wall`), not ours alone: a clock a day behind must not let
        DynamoDB expire a live member."""
        now = self._clock.wall()
        load = self.pending_load
        self.counter = self._table.heartbeat(
            self.instance_id,
            epoch=self.epoch,
            status=self.status,
            now_wall=now,
            ttl_wall=max(now, ttl_floor_wall),
            queues_hash=self.queues_hash,
            load=load,
            idle=self.idle_source() if self.idle_source is not None else None,
        )
        if self.pending_load is load:
            self.pending_load = None  # landed (a failure raised above: sent again)

    def rejoin(self) -> None:
        """Our row is gone (judged dead and removed, TTL, a hand): register again as a new
        incarnation of the same id. A row in its place means a live second process."""
        self.epoch = uuid.uuid4().hex
        try:
            self._table.create_member(self._record(self.counter + 1))
        except ConditionFailed:
            raise DuplicateInstanceError(_duplicate_message(self.instance_id)) from None
        self.counter += 1

    def leave(self) -> None:
        if self.is_registered:
            # If the condition fails the row is someone else's now: not ours to delete.
            with contextlib.suppress(ConditionFailed):
                self._table.delete_member(self.instance_id, epoch=self.epoch)
            self.is_registered = False


def _duplicate_message(instance_id: str) -> str:
    return (
        f'instance_id "{instance_id}" is in use by a live instance '
        "(its heartbeat is moving); give each instance its own id"
    )
