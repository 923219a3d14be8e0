"""The ownership rows this instance holds, and every write it makes to ownership rows.

A queue is consumed only while we hold its row (owner + lease as fencing token). Each
write is conditional on the row as we last saw it, keeps our copy of the rows true
(rows.OwnershipView) and is announced by its shard's version; a failed condition or a
lost answer makes that shard be read again. Releases are retried until they land: a row
left naming us would make its planned owner wait for ever (issue 11, defect 5).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqsbalancerd.aws import describe_error
from sqsbalancerd.clock import Clock
from sqsbalancerd.coordination.replicas import base_of
from sqsbalancerd.coordination.rows import OwnershipView
from sqsbalancerd.coordination.table import (
    ConditionFailed,
    CoordinationTable,
    OwnershipRecord,
    TableGone,
)
from sqsbalancerd.runtime import map_bounded

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Holdings:
    leases: dict[str, int] = field(default_factory=dict)  # queue -> lease we hold
    releasing: set[str] = field(default_factory=set)  # draining in the engine
    # Drained, but the release failed (throttled, say): the row still names us, so the
    # planned owner waits for it. Retried until it succeeds or the row is not ours.
    unreleased: dict[str, int] = field(default_factory=dict)
    # Appended from the engine's thread without our lock (a slow DynamoDB call holds it).
    drained: deque[str] = field(default_factory=deque)
    # Slots given up while we consume their queue through another slot: nothing to drain.
    unused: set[str] = field(default_factory=set)

    @property
    def consuming(self) -> set[str]:
        return set(self.leases) - self.releasing


class Leases:
    def __init__(
        self,
        table: CoordinationTable,
        ownership: OwnershipView,
        *,
        clock: Clock,
        instance_id: str,
        write_concurrency: int = 1,
    ) -> None:
        self._table = table
        self._ownership = ownership
        self._clock = clock
        self._me = instance_id
        self._write_concurrency = write_concurrency
        self.holdings = Holdings()
        # Written into rows we take: the planning epoch's time, for the dwell (None: none).
        self.moved_at_s: float | None = None

    def acquire(self, queue: str, url: str, previous: OwnershipRecord | None) -> bool:
        """Write the row naming us, conditional on `previous`; False if it had changed."""
        return self.acquire_many([(queue, url, previous)])[0]

    def acquire_many(self, takes: Sequence[tuple[str, str, OwnershipRecord | None]]) -> list[bool]:
        """`acquire` for each (queue, url, previous), up to `write_concurrency` writes at
        once: each is conditional on its own row, as alone, and what they return is applied
        here in order, so our copy and holdings change as if they had been made one by one.
        A lost answer is raised after every other result is applied (a write that landed
        must be held: its row names us)."""
        outcomes = self._write_all(takes)
        took: list[bool] = []
        lost: Exception | None = None
        for (queue, url, _), outcome in zip(takes, outcomes, strict=False):
            if isinstance(outcome, ConditionFailed):
                self._ownership.distrust(queue)  # changed since we read it: read it again
            elif isinstance(outcome, Exception):
                self._ownership.distrust(queue, may_have_landed=True)
                lost = lost or outcome
            else:
                self.holdings.leases[queue] = outcome
                self._note(queue, url, outcome)
            took.append(not isinstance(outcome, Exception))
        if lost is not None:
            raise lost
        return took

    def _write_all(
        self, takes: Sequence[tuple[str, str, OwnershipRecord | None]]
    ) -> list[int | Exception]:
        """Each take's new lease, or what its write raised. One at a time, the first lost
        answer ends the batch (as a round of single writes did); concurrently, all run."""

        def write(take: tuple[str, str, OwnershipRecord | None]) -> int | Exception:
            queue, url, previous = take
            try:
                return self._table.acquire(
                    queue,
                    url,
                    owner=self._me,
                    previous=previous,
                    now_wall=self._clock.wall(),
                    moved_at=self.moved_at_s,
                )
            except Exception as exc:  # applied in order by the caller's thread
                return exc

        if self._write_concurrency > 1:
            return map_bounded(
                write, takes, max_workers=self._write_concurrency, name="sqsb-acquire"
            )
        outcomes: list[int | Exception] = []
        for take in takes:
            outcomes.append(write(take))
            if isinstance(outcomes[-1], Exception) and not isinstance(
                outcomes[-1], ConditionFailed
            ):
                break
        return outcomes

    def release(self, queue: str, lease: int, *, url: str | None) -> bool:
        """Release our row (`url` None: the queue is gone, delete the row); False to try
        again later."""
        try:
            if url is not None:
                self._table.release(queue, owner=self._me, lease=lease, now_wall=self._clock.wall())
                self._ownership.note_write(
                    OwnershipRecord(queue, url, None, lease + 1, self._clock.wall()), queue
                )
            else:
                self._table.delete_ownership(queue, lease=lease)
                self._ownership.note_write(None, queue)
        except ConditionFailed:
            self._ownership.distrust(queue)
            logger.warning("ownership row changed before release", extra={"queue": queue})
        except TableGone:
            raise
        except Exception as exc:
            self._ownership.distrust(queue, may_have_landed=True)
            logger.warning(
                "could not release a queue; retrying",
                extra={"queue": queue, "error": describe_error(exc)},
            )
            return False
        return True

    def delete_stale(self, queue: str, lease: int) -> None:
        """Remove the row of a queue that no longer exists (conditional on its lease)."""
        try:
            self._table.delete_ownership(queue, lease=lease)
        except ConditionFailed:
            self._ownership.distrust(queue)
            return
        self._ownership.note_write(None, queue)
        logger.info("removed the row of a queue that no longer exists", extra={"queue": queue})

    def settle_drained(self, url_of: Callable[[str], str | None]) -> None:
        """Release the rows of queues the engine finished draining, and unused slots.

        A queue drained: the slots of it we were giving up (replicas.py); if we were giving
        none up, the engine stopped on its own (the queue is gone) and every slot of it
        goes. Never a slot we still consume by: one taken while the queue drained keeps it
        consumed (the engine starts it again instead of reporting it drained)."""
        holdings = self.holdings
        unused, holdings.unused = holdings.unused, set()
        for slot in sorted(unused):
            if slot in holdings.releasing:
                self._release_slot(slot, url_of)
        while holdings.drained:
            name = holdings.drained.popleft()
            held = {s for s in holdings.leases if base_of(s) == name} | {name}
            giving_up = held & holdings.releasing
            for slot in sorted(giving_up or held):
                self._release_slot(slot, url_of)

    def _release_slot(self, slot: str, url_of: Callable[[str], str | None]) -> None:
        holdings = self.holdings
        holdings.releasing.discard(slot)
        lease = holdings.leases.pop(slot, None)
        if lease is not None and not self.release(slot, lease, url=url_of(slot)):
            holdings.unreleased[slot] = lease

    def retry_releases(
        self, url_of: Callable[[str], str | None], has_time: Callable[[], bool]
    ) -> None:
        """Once a round (not between rounds: a throttled table gets no faster for it)."""
        for queue, lease in sorted(self.holdings.unreleased.items()):
            if not has_time():
                break
            if self.release(queue, lease, url=url_of(queue)):
                del self.holdings.unreleased[queue]

    def release_all(self, url_of: Callable[[str], str | None]) -> None:
        """Leaving: what fails is freed when we are judged dead."""
        held = {**self.holdings.unreleased, **self.holdings.leases}
        for queue, lease in sorted(held.items()):
            self.release(queue, lease, url=url_of(queue))
        self.holdings.leases.clear()
        self.holdings.unreleased.clear()

    def drop_lost(self) -> bool:
        """After a fence: keep only the queues whose rows are still ours. False when the rows
        could not be read: stay fenced and try again (issue 11, defect 8)."""
        try:
            self._ownership.verify(set(self.holdings.leases), self._clock.monotonic())
        except Exception as exc:
            logger.warning(
                "could not verify ownership after a fence; still fenced",
                extra={"error": describe_error(exc)},
            )
            return False
        rows = self._ownership.rows
        for queue, lease in list(self.holdings.leases.items()):
            row = rows.get(queue)
            if row is None or row.owner != self._me or row.lease != lease:
                logger.warning("lost a queue while fenced", extra={"queue": queue})
                del self.holdings.leases[queue]
        return True

    def _note(self, queue: str, url: str, lease: int) -> None:
        record = OwnershipRecord(
            queue, url, self._me, lease, self._clock.wall(), moved_at=self.moved_at_s
        )
        self._ownership.note_write(record, queue)
