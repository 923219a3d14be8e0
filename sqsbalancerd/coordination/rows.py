"""What this instance knows of the ownership rows, kept fresh by the shards' versions.

Every ownership write is followed by an advance of its shard's version (table.py), so one
small query of the versions each round says which shards changed since we read them; only
those are read again. Steady state reads no ownership row; a handoff reads the shards it
touched. A shard is also read again after a conditional write on it failed (our copy was
wrong) or a write's answer was lost (it may have landed). What no version announces — an
edit by hand, a writer that died between its write and the advance — is found by the
sweep's check of the rows we hold, or by the conditional write it makes fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqsbalancerd.coordination.table import (
    SHARDS,
    CoordinationTable,
    OwnershipRecord,
    shard_of,
)
from sqsbalancerd.runtime import map_bounded


@dataclass(slots=True)
class _Shard:
    rows: dict[str, OwnershipRecord] = field(default_factory=dict)
    version: int | None = None  # as of our last read; None: never read, or to read again


class OwnershipView:
    def __init__(self, table: CoordinationTable, *, read_concurrency: int = 1) -> None:
        self._table = table
        # Shards read at once when several moved (a handoff moves them all): a round's reads
        # take one shard's latency, not sixteen (on a slow table, longer than the fence).
        self._read_concurrency = read_concurrency
        self._shards = [_Shard() for _ in range(SHARDS)]
        self._merged: dict[str, OwnershipRecord] | None = None
        self._unannounced: set[int] = set()  # shards we wrote and did not advance yet
        # Queues whose row we saw, then found gone: since when (monotonic s).
        self.missing_since: dict[str, float] = {}

    @property
    def rows(self) -> dict[str, OwnershipRecord]:
        """Every row as last read (plus our own writes since). Do not change it."""
        if self._merged is None:
            self._merged = {q: r for shard in self._shards for q, r in shard.rows.items()}
        return self._merged

    def row(self, queue: str) -> OwnershipRecord | None:
        """One row as last read (no merge of every shard: the rounds that guard holdings)."""
        return self._shards[shard_of(queue)].rows.get(queue)

    def refresh(self, now_s: float) -> bool:
        """Read the shards whose version moved; True if any was read."""
        versions = self._table.shard_versions()
        changed = [s for s, shard in enumerate(self._shards) if shard.version != versions.get(s, 0)]
        if self._read_concurrency > 1 and len(changed) > 1:
            read = map_bounded(
                self._read_shard, changed, max_workers=self._read_concurrency, name="sqsb-shards"
            )
            # Each shard read stands on its own (its rows are at least as new as the version
            # read before them), so one that failed does not cost the others: under partial
            # throttling, all or none could fail round after round and learn nothing.
            failures = [fresh for fresh in read if isinstance(fresh, Exception)]
            for shard, fresh in zip(changed, read, strict=True):
                if not isinstance(fresh, Exception):
                    self._apply_shard(shard, fresh, versions.get(shard, 0), now_s)
            if failures:
                raise failures[0]
            return True
        for shard in changed:
            self._apply_shard(shard, self._table.shard_rows(shard), versions.get(shard, 0), now_s)
        return bool(changed)

    def _read_shard(self, shard: int) -> dict[str, OwnershipRecord] | Exception:
        try:
            return self._table.shard_rows(shard)
        except Exception as error:  # handed back: refresh raises it after the others apply
            return error

    def _apply_shard(
        self, shard: int, fresh: dict[str, OwnershipRecord], version: int, now_s: float
    ) -> None:
        self._track_vanished(self._shards[shard].rows, fresh, now_s)
        self._shards[shard] = _Shard(fresh, version)
        self._merged = None

    def verify(self, queues: set[str], now_s: float) -> None:
        """Read the named rows themselves (hand edits announce nothing): our holdings."""
        if not queues:
            return
        found = self._table.rows_of(queues)
        for queue in queues:
            rows = self._shards[shard_of(queue)].rows
            before = {queue: rows[queue]} if queue in rows else {}
            self._track_vanished(before, {queue: found[queue]} if queue in found else {}, now_s)
            if queue in found:
                rows[queue] = found[queue]
            else:
                rows.pop(queue, None)
        self._merged = None

    def _track_vanished(
        self,
        before: dict[str, OwnershipRecord],
        after: dict[str, OwnershipRecord],
        now_s: float,
    ) -> None:
        for queue in before.keys() - after.keys():
            self.missing_since.setdefault(queue, now_s)
        for queue in self.missing_since.keys() & after.keys():  # usually none: no loop
            del self.missing_since[queue]

    def note_write(self, record: OwnershipRecord | None, queue: str) -> None:
        """Our write landed: keep our copy true to it, and announce it at `announce`."""
        shard = shard_of(queue)
        if record is None:
            self._shards[shard].rows.pop(queue, None)
        else:
            self._shards[shard].rows[queue] = record
        self._unannounced.add(shard)
        self._merged = None

    def distrust(self, queue: str, *, may_have_landed: bool = False) -> None:
        """A conditional write failed (our copy is wrong), or its answer was lost."""
        shard = shard_of(queue)
        self._shards[shard].version = None
        if may_have_landed:
            self._unannounced.add(shard)

    def announce(self) -> None:
        """Advance the version of every shard we wrote (once per round, not per write)."""
        for shard in sorted(self._unannounced):
            version = self._table.advance_shard(shard)
            self._unannounced.discard(shard)
            state = self._shards[shard]
            # Only we wrote since our read: our copy is current at the new version.
            if state.version is not None and version == state.version + 1:
                state.version = version
            else:
                state.version = None
