"""`coordination.mode = "dynamodb"`: share the discovered queues with the other instances.

Every heartbeat interval: renew our row, read the member rows, judge liveness on our own
clock, and — once the view (live members, queues) has been stable for `rebalance_delay` —
plan from the ownership rows: `ring.rebalance` keeps every queue with its owner unless
balance needs it moved, so a join or leave moves close to the minimum. A queue is consumed
only while we hold its ownership row (owner + lease as fencing token). We give a queue up
by draining it first and releasing the row after; we take one when its row is free or its
owner is dead.

Plans agree because every instance reads the same rows: all see a view change within one
round of each other and plan after the same delay, and nobody releases a queue until
RELEASE_DELAY_ROUNDS after planning, so each plan is made before any move. After a plan we
follow the handoff (each round rereading the shards whose version moved) until the rows
are the assignment's fixed point, and then keep exactly what they give us. A handoff
that stops moving is planned again from the rows as they are, and a row left free for
ORPHAN_ROUNDS (plans made from different views, say a queue only some have discovered) is
taken by a following instance with room, so a disagreement cannot leave a queue unowned.

The parts: membership.py (join, heartbeat, liveness verdicts), peers.py (who is in the
ring), rows.py (our copy of
the ownership rows, read only when a shard moved), leases.py (the rows we hold and every
write to them), handoff.py (following a plan until the rows settle), sweep.py (what a
periodic look at the rows repairs), fence.py (self-fencing). This module is the round
loop that wires them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqsbalancerd.aws import describe_error, is_transient
from sqsbalancerd.clock import Clock
from sqsbalancerd.config import CoordinationSettings
from sqsbalancerd.coordination import loadsummary
from sqsbalancerd.coordination.fence import Fence, ReceiveControl
from sqsbalancerd.coordination.handoff import (
    ORPHAN_ROUNDS,
    RELEASE_DELAY_ROUNDS,
    STALL_ROUNDS,
    Handoff,
    is_settled,
)
from sqsbalancerd.coordination.leases import Leases
from sqsbalancerd.coordination.loadbalance import (
    Assignment,
    LoadContext,
    assign,
    complete_context,
    epoch_of,
)
from sqsbalancerd.coordination.loadplan import PlanSettings
from sqsbalancerd.coordination.membership import LivenessTracker, Membership
from sqsbalancerd.coordination.peers import Peers
from sqsbalancerd.coordination.replicas import base_of
from sqsbalancerd.coordination.ring import capacity, rebalance
from sqsbalancerd.coordination.rows import OwnershipView
from sqsbalancerd.coordination.sweep import SWEEP_ROUNDS, SweepFindings, check_held, inspect
from sqsbalancerd.coordination.table import (
    ConditionFailed,
    CoordinationTable,
    OwnershipRecord,
    TableGone,
)
from sqsbalancerd.discovery import DiscoveryResult, QueueInfo
from sqsbalancerd.errors import AwsUnavailableError, DuplicateInstanceError, SqsBalancerError
from sqsbalancerd.stats import CoordinationStats

logger = logging.getLogger(__name__)

# Not having read the member rows for longer than this (rounds are one interval apart)
# makes us restart every peer's liveness clock: our blindness is not their death.
BLIND_ROUNDS = 1.5
# Waits between start attempts after a transient DynamoDB failure (about 30 s in all, each
# attempt being botocore's own two): then exit 1 with one line, as for an unreachable table.
START_RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0)
# A round stops writing rows after this many intervals (the rest waits for the next
# round); within it the heartbeat is renewed whenever due, so no round starves it.
ROUND_BUDGET_ROUNDS = 1.0
# Acquisitions go out in chunks of this many times the write concurrency, the budget
# checked between chunks: at start-up an instance takes its whole share in a round or two
# (one write at a time, 1,000 rows took a round per 100-200 on a loaded emulator).
ACQUIRE_CHUNK_WRITES = 4


@dataclass(slots=True)
class _View:
    members: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()
    changed_at_s: float = 0.0
    # Every live member reports our queue set: only then may balance move a queue.
    is_agreed: bool = True

    @property
    def key(self) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
        return self.members, self.queues, self.is_agreed


def ring_signature(settings: CoordinationSettings) -> str:
    """The ring parameters a member plans with, as published in its row."""
    return f"{settings.virtual_nodes}/{settings.load_factor!r}"


def queues_hash(queues: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(queues)).encode()).hexdigest()[:16]


class DynamoCoordinator:
    def __init__(
        self,
        *,
        table: CoordinationTable,
        settings: CoordinationSettings,
        instance_id: str,
        region: str,
        clock: Clock,
        set_owned: Callable[[Iterable[QueueInfo]], None],
        control: ReceiveControl,
        spawn: Callable[[str, Callable[[threading.Event], None], threading.Event], object],
        fail: Callable[[str], None],
        load_source: Callable[[], loadsummary.LoadSummary] | None = None,
        workers: int = 0,
        table_concurrency: int = 1,
        idle_source: Callable[[], tuple[int, float]] | None = None,
    ) -> None:
        self._table = table
        self._settings = settings
        self.instance_id = instance_id
        self._region = region
        self._clock = clock
        self._set_owned = set_owned
        self._control = control
        self._spawn = spawn
        self._fail = fail
        self._membership = Membership(
            table,
            instance_id=instance_id,
            clock=clock,
            heartbeat_interval_s=settings.heartbeat_interval,
            heartbeat_timeout_s=settings.heartbeat_timeout,
            ring=ring_signature(settings),
        )
        self._membership.idle_source = idle_source  # published for `status`
        self._liveness = LivenessTracker(
            clock,
            timeout_s=settings.heartbeat_timeout,
            blind_after_s=BLIND_ROUNDS * settings.heartbeat_interval,
        )
        self._peers = Peers(table, self._liveness, self._membership, instance_id=instance_id)
        self._lock = threading.RLock()  # table I/O and state: loop thread vs main thread
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._queues: dict[str, QueueInfo] = {}
        self._view = _View()
        self._applied: tuple[tuple[str, ...], tuple[str, ...], bool] | None = None
        self._target: frozenset[str] = frozenset()
        self._release_at_s = 0.0
        self._handoff: Handoff | None = None
        # Calls of one round made at once (shard reads, acquisitions): 1 in the simulation.
        self._ownership = OwnershipView(table, read_concurrency=table_concurrency)
        self._rows_changed = False  # a shard was read again this round
        self._leases = Leases(
            table,
            self._ownership,
            clock=clock,
            instance_id=instance_id,
            write_concurrency=table_concurrency,
        )
        self._acquire_chunk = ACQUIRE_CHUNK_WRITES * max(1, table_concurrency)
        self._holdings = self._leases.holdings
        self._fence = Fence(
            clock=clock,
            control=control,
            budget_s=settings.heartbeat_timeout - settings.effective_fence_margin,
            instance_id=instance_id,
        )
        self._is_draining = False
        self._rebalances = 0
        self._has_observed = False  # this round read the member rows
        self._interval_s = settings.heartbeat_interval
        self._next_sweep_s = 0.0
        # A holder sweeps at least this often, then rewrites a row deleted under it.
        self._vanished_wait_s = (
            (SWEEP_ROUNDS + 1) * self._interval_s + settings.heartbeat_timeout
        )  # the latest heartbeat time any member recorded
        # Views are stamped with the start of the round that saw them, so the delay is
        # counted in whole rounds (which start `interval` apart), not skewed by call latency.
        self._round_started_s = clock.monotonic()
        # Load-aware planning (loadbalance.py): None measures nothing and plans by count.
        self._load_source = load_source if settings.balance == "load" else None
        self._workers = workers
        self._published_epoch = ""
        self._joined_epoch_s: float | None = None
        self._published: loadsummary.LoadSummary | None = None  # for snapshot()
        self._load: LoadContext | None = None  # the latest complete epoch
        # The epoch plans and handoff checks weigh by: the latest one between handoffs,
        # pinned during one, so that a handoff is judged by the plan it follows (a newer
        # epoch completing halfway must not end it with the giver's release still to come).
        self._planning: LoadContext | None = None
        self._load_planned = ""  # the epoch we last planned by
        self._plan_settings = PlanSettings(
            load_factor=settings.load_factor,
            virtual_nodes=settings.virtual_nodes,
            min_dwell_s=settings.load_min_dwell,
            max_replicas=settings.max_replicas,
        )
        self._assigned: tuple[object, Assignment] | None = None  # the last plan, by inputs
        self._unowned: int | None = None  # for snapshot(): counted by the loop thread

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Join; a transient failure (timeout, throttling, 5xx) is retried for about 30 s,
        so that one slow answer does not end a start that has consumed nothing yet."""
        for retry_in_s in (*START_RETRY_DELAYS_S, None):
            try:
                self._join()
                break
            except SqsBalancerError:
                raise
            except Exception as exc:  # botocore's bounded retries are spent
                if retry_in_s is None or not is_transient(exc):
                    raise _unavailable(self._table.table_name, exc) from exc
                logger.warning(
                    "DynamoDB failed at start; retrying",
                    extra={
                        "table": self._table.table_name,
                        "error": describe_error(exc),
                        "retry_in_s": retry_in_s,
                    },
                )
                if self._stop.wait(retry_in_s):
                    raise _unavailable(self._table.table_name, exc) from exc
        logger.info(
            "joined the cluster",
            extra={"instance": self.instance_id, "table": self._table.table_name},
        )
        self._spawn("coordinator", self.run, self._stop)

    def _join(self) -> None:
        """What start retries: each step is idempotent, and a row we registered (on an
        earlier attempt whose later step failed) is not registered again."""
        self._table.ensure(create=self._settings.create_table, region=self._region)
        if not self._membership.is_registered:
            started = self._clock.monotonic()
            self._membership.join(self._stop.wait)
            self._fence.renewed_at_s = started
            self._fence.install()
        self._round_started_s = self._clock.monotonic()
        self._observe_members()
        self._view.changed_at_s = self._round_started_s
        self._read_rows_at_join()

    def _read_rows_at_join(self) -> None:
        """Every shard once, before the first round (whose budget it would eat otherwise);
        what fails here the first round reads instead."""
        try:
            self._ownership.refresh(self._round_started_s)
        except (TableGone, DuplicateInstanceError):
            raise
        except Exception as exc:
            logger.warning(
                "could not read the ownership rows yet", extra={"error": describe_error(exc)}
            )

    def run(self, stop: threading.Event) -> None:
        fence = self._fence
        fence.next_round_s = self._clock.monotonic() + self._interval_s
        while not stop.is_set():
            now = self._clock.monotonic()
            if now >= fence.next_round_s:
                fence.next_round_s = now + self._interval_s
                self.tick()
            else:
                self.reconcile_released()
                self._check_fence()
            self._wake.wait(min(0.25, max(0.0, fence.next_round_s - self._clock.monotonic())))
            self._wake.clear()

    def on_discovered(self, result: DiscoveryResult) -> None:
        with self._lock:
            self._queues = {info.name: info for info in result.matched}
            self._membership.queues_hash = queues_hash(self._queues)
        self._wake.set()

    def on_released(self, queue_name: str) -> None:
        """The engine finished draining a queue we gave up: release its row."""
        self._holdings.drained.append(queue_name)
        self._wake.set()

    def begin_drain(self) -> None:
        """Announce `draining` at once, so survivors rebalance without us."""
        with self._lock:
            self._is_draining = True
            self._membership.status = "draining"
            try:
                self._membership.heartbeat()
            except Exception as exc:
                logger.warning("could not announce draining", extra={"error": describe_error(exc)})

    def leave(self) -> None:
        """After the engine drained: release every row we hold, remove our member row."""
        self._stop.set()
        with self._lock:
            self._leases.release_all(self._url_of)
            try:
                self._ownership.announce()
            except Exception as exc:  # the survivors' sweep finds the free rows anyway
                logger.warning("could not announce releases", extra={"error": describe_error(exc)})
            self._membership.leave()
        logger.info("left the cluster", extra={"instance": self.instance_id})

    # -- one heartbeat --------------------------------------------------------------------

    def tick(self) -> None:
        with self._lock:
            self._round_started_s = self._clock.monotonic()
            self._rows_changed = False
            self._has_observed = False
            try:
                self._renew()
                self._observe_members()
                self._remove_dead_rows()
                self._note_load()
                self.reconcile_released()
                self._retry_releases()
                self._rows_changed = self._ownership.refresh(self._round_started_s)
                self._rebalance_if_settled()
                self._follow_handoff()
                self._sweep()
                self._give_up_untargeted()
                self._ownership.announce()
                self._unowned = self._count_unowned()
            except (TableGone, DuplicateInstanceError) as exc:
                self._fail(str(exc))
            except Exception as exc:  # a loop boundary: DynamoDB slow, throttled or away
                if not self._has_observed:  # blind this round: not the peers' fault
                    self._liveness.note_missed_read()
                logger.warning("coordination round failed", extra={"error": describe_error(exc)})
            self._check_fence()

    def _renew(self) -> bool:
        """Renew our row; False if it had been taken and we rejoined (holding nothing)."""
        started = self._clock.monotonic()
        renewed = True
        try:
            self._membership.heartbeat(ttl_floor_wall=self._peers.latest_wall_s)
        except ConditionFailed:
            self._rejoin()  # it wrote a fresh row: that renews too
            renewed = False
        self._fence.renewed(started)
        return renewed

    def _has_time(self) -> bool:
        """Between two writes of a long round: renew when due; False once the round's
        budget is spent (or we rejoined): leave the rest for the next round."""
        now = self._clock.monotonic()
        if now - self._round_started_s >= ROUND_BUDGET_ROUNDS * self._interval_s:
            return False
        renewed = self._fence.renewed_at_s
        if renewed is not None and now - renewed >= self._interval_s:
            return self._renew()
        return True

    def _rejoin(self) -> None:
        """Our row was removed (we were judged dead during a partition, or TTL or a hand
        deleted it). Peers may have taken our queues: give every one up (drained, then
        released if the row is still ours), register as a new incarnation, plan again."""
        logger.warning(
            "lost our member row (judged dead, or removed); rejoining as a new incarnation",
            extra={"instance": self.instance_id, "queues": len(self._holdings.leases)},
        )
        # Give up first: the registration below may fail, or succeed with its answer lost
        # (the next heartbeat then renews the new epoch) — either way we hold nothing.
        self._target = frozenset()
        self._handoff = None
        self._applied = None
        self._holdings.releasing |= set(self._holdings.leases)
        self._push_owned()
        self._view = _View(self._view.members, self._view.queues, self._round_started_s)
        self._membership.rejoin()  # DuplicateInstanceError: a live process has our id

    def _observe_members(self, *, consistent: bool = False) -> None:
        members = self._peers.observe(is_draining=self._is_draining, consistent=consistent)
        self._has_observed = True
        self._note_view(members=members)

    def _remove_dead_rows(self) -> None:
        if self._peers.remove_dead():
            self._observe_members(consistent=True)  # our read was stale: not again

    def _note_view(self, *, members: tuple[str, ...] | None = None) -> None:
        queues = tuple(sorted(self._queues))
        members = members if members is not None else self._view.members
        agreed = self._peers.agree
        if (members, queues, agreed) != self._view.key:
            self._view = _View(members, queues, self._round_started_s, agreed)

    # -- assignment -----------------------------------------------------------------------

    def _rebalance_if_settled(self) -> None:
        self._note_view()
        view = self._view.key
        settled = self._round_started_s - self._view.changed_at_s >= self._settings.rebalance_delay
        if settled and view == self._applied:
            self._plan_for_epoch()
        if not settled or view == self._applied:
            return
        self._planning = self._load
        if self._load is not None:
            self._load_planned = self._load.epoch.token  # this plan weighs its loads
        if self._is_draining:
            self._target = frozenset()
            self._release_at_s = self._round_started_s
        else:
            # Reading the rows may fail (throttled): the view counts as applied only once
            # planned, or it would never be planned at all.
            self._plan(self._owners())
            self._handoff = Handoff(planned_at_s=self._round_started_s)
        if self._applied is not None:
            self._rebalances += 1
        self._applied = view

    def _plan(self, owners: dict[str, str]) -> None:
        found = self._assign(owners)
        self._target = frozenset(q for q, o in found.owners.items() if o == self.instance_id)
        before = frozenset(self._holdings.leases)
        self._log_moves(found)
        if not self._view.is_agreed:
            # Members see different queue sets (discovery is not synchronised): moving a
            # queue for balance now would move it back once they agree. Keep what we hold
            # and take only free rows; the balance moves wait for agreement.
            held = {q for q in self._holdings.leases if base_of(q) in self._queues}
            self._target |= frozenset(held) | self._free_known(owners)
        interval = self._settings.heartbeat_interval
        self._release_at_s = self._round_started_s + RELEASE_DELAY_ROUNDS * interval
        logger.info(
            "assignment computed",
            extra={
                "members": len(self._view.members),
                "queues": len(self._view.queues),
                "mine": len(self._target),
                "to_take": len(self._target - before),
                "to_give": len(before - self._target),
                "by": "count"
                if self._planning is None
                else f"load, epoch {self._planning.epoch.token}",
            },
        )

    # -- load-aware planning (loadbalance.py) ---------------------------------------------

    def _note_load(self) -> None:
        """Publish our summary once per epoch; keep the latest epoch everyone published."""
        if self._load_source is None:
            return
        epoch = epoch_of(self._view.members, self._peers.records, self._settings.load_interval)
        if epoch is None:
            return
        if epoch.token != self._published_epoch:
            self._published_epoch = epoch.token
            if self._joined_epoch_s is None:
                self._joined_epoch_s = epoch.now_s
            measured = self._load_source()
            self._published = measured
            summary = loadsummary.encode(measured)
            self._membership.pending_load = (
                epoch.token,
                summary,
                self._workers,
                self._joined_epoch_s,
            )
        self._leases.moved_at_s = epoch.now_s
        context = complete_context(epoch, self._view.members, self._peers.records)
        if context is not None:
            self._load = context
        if self._handoff is None:
            self._planning = self._load

    def _plan_for_epoch(self) -> None:
        """A newly complete epoch: plan by its loads once; steady state moves nothing."""
        context = self._load
        if (
            context is None
            or context.epoch.token == self._load_planned
            or self._handoff is not None
            or self._is_draining
            or not self._view.is_agreed
        ):
            return
        self._load_planned = context.epoch.token
        self._planning = context
        owners = self._owners()
        found = self._assign(owners)
        known = set(self._view.queues)
        if found.owners == {s: o for s, o in owners.items() if base_of(s) in known}:
            return
        self._plan(owners)
        self._handoff = Handoff(planned_at_s=self._round_started_s)
        self._rebalances += 1

    def _assign(self, owners: dict[str, str]) -> Assignment:
        """Every queue's owner: by load from the latest complete epoch, else by count."""
        queues, members = self._view.queues, self._view.members
        context = self._planning
        if context is None or not members:
            found = rebalance(
                queues,
                members,
                owners,
                virtual_nodes=self._settings.virtual_nodes,
                load_factor=self._settings.load_factor,
            )
            return Assignment(found, ())
        rows = self._rows()
        moved = tuple(sorted((q, o, *_history(rows.get(q))) for q, o in owners.items()))
        key = (context.epoch.token, members, queues, moved)
        if self._assigned is not None and self._assigned[0] == key:
            return self._assigned[1]
        found_load = assign(
            context,
            queues=queues,
            members=members,
            rows=rows,
            owners=owners,
            settings=self._plan_settings,
        )
        self._assigned = (key, found_load)
        return found_load

    def _log_moves(self, found: Assignment) -> None:
        """Why the planner moved each queue that leaves or joins us."""
        for move in found.moves:
            if self.instance_id in (*move.before, *move.after):
                logger.info(
                    "planner moves a queue",
                    extra={
                        "queue": move.queue,
                        "from": list(move.before),
                        "to": list(move.after),
                        "reason": move.reason,
                    },
                )

    def _free_known(self, owners: dict[str, str]) -> frozenset[str]:
        """Queues we know whose rows name no live member, up to our share."""
        members = set(self._view.members)
        free = sorted(q for q in self._queues if owners.get(q) not in members)
        room = capacity(
            queue_count=len(self._queues),
            member_count=max(1, len(members)),
            load_factor=self._settings.load_factor,
        ) - len(self._target)
        return frozenset(free[: max(0, room)])

    def _rows(self) -> dict[str, OwnershipRecord]:
        """The ownership rows as of this round's refresh (see rows.py), with our writes."""
        return self._ownership.rows

    # -- sweep ----------------------------------------------------------------------------

    def _sweep(self) -> None:
        """Once every SWEEP_ROUNDS outside a handoff: reread our rows and act on what differs
        from what we believe (see sweep.py). A handoff follows the rows on its own; in its
        rounds only what we hold is checked."""
        is_due = self._handoff is None and self._round_started_s >= self._next_sweep_s
        if self._is_draining or self._fence.is_fenced or not (is_due or self._rows_changed):
            return
        if not is_due:
            self._check_holdings()  # rows changed: guard what we hold, no more
            return
        self._next_sweep_s = self._round_started_s + SWEEP_ROUNDS * self._interval_s
        holdings = self._holdings
        # Our own rows (held, or naming us: adopting one writes nothing, so it must not rest
        # on our copy) are read themselves: an edit by hand announces nothing.
        naming_us = {q for q, row in self._rows().items() if row.owner == self.instance_id}
        self._ownership.verify(
            {*holdings.leases, *holdings.unreleased, *naming_us}, self._round_started_s
        )
        found = inspect(
            self._rows(),
            me=self.instance_id,
            held=holdings.leases,
            unreleased=holdings.unreleased,
            wanted=self._target,
            known=self._known_slots(),
            members=set(self._view.members),
            is_dead=self._liveness.is_dead,
        )
        self._apply_sweep(found)
        if found.needs_plan and self._handoff is None and self._applied == self._view.key:
            logger.info("sweep found queues without a live owner; planning again")
            self._plan(self._owners())
            self._handoff = Handoff(planned_at_s=self._round_started_s)

    def _check_holdings(self) -> None:
        """Shards reread this round: stop on a held row taken, rewrite one deleted
        under us (an acquirer waiting for a vanished row must find it back)."""
        lost, missing = check_held(
            self._ownership.row, me=self.instance_id, held=self._holdings.leases
        )
        self._apply_sweep(SweepFindings(lost=lost, missing=missing))

    def _apply_sweep(self, found: SweepFindings) -> None:
        holdings = self._holdings
        for queue in sorted(found.lost):
            logger.warning("our ownership row names another owner; stopped", extra={"queue": queue})
            del holdings.leases[queue]
        for queue in sorted(found.missing):
            self._holdings.leases.pop(queue)
            self._rewrite_row(queue)
        for queue in sorted(found.repair):
            holdings.unreleased.pop(queue, None)
            if self._rewrite_row(queue) and queue not in self._target:
                holdings.unreleased[queue] = holdings.leases.pop(queue)
        holdings.leases.update(found.adopt)
        holdings.unreleased.update(found.disown)  # released by _retry_releases
        for queue, lease in sorted(found.stale.items()):
            if not self._has_time():
                break
            self._leases.delete_stale(queue, lease)
        if found.lost or found.missing or found.adopt or found.repair:
            self._push_owned()

    def _rewrite_row(self, queue: str) -> bool:
        """A row of ours deleted or damaged by hand: write it again (before anyone may take
        it: an acquirer waits `_vanished_wait_s` for a row it saw vanish), or stop."""
        info = self._queues.get(base_of(queue))
        if info is None:
            return False
        previous = self._rows().get(queue)  # None, or ours with a damaged lease
        if not self._leases.acquire(queue, info.url, previous):
            logger.warning("our ownership row was taken; stopped", extra={"queue": queue})
            return False
        return True

    def _count_unowned(self) -> int:
        """Known queues whose row names no live member (as `_free_known` sees them)."""
        owners, members = self._owners(), set(self._view.members)
        return sum(1 for queue in self._queues if owners.get(queue) not in members)

    def _owners(self) -> dict[str, str]:
        owners = {queue: row.owner for queue, row in self._rows().items() if row.owner}
        owners.update(dict.fromkeys(self._holdings.leases, self.instance_id))
        return owners

    def _follow_handoff(self) -> None:
        if self._is_draining or self._fence.is_fenced:
            return
        wanted = {
            q for q in self._target - set(self._holdings.leases) if base_of(q) in self._queues
        }
        if wanted and not self._peers.older_alive:
            rows = self._rows()
            pending = sorted(wanted)
            for start in range(0, len(pending), self._acquire_chunk):
                if not self._has_time():
                    break
                chunk = pending[start : start + self._acquire_chunk]
                self._try_acquire([(queue, rows.get(queue)) for queue in chunk])
            self._push_owned()
        if self._handoff is not None:
            self._check_handoff(self._handoff, self._owners())

    def _check_handoff(self, handoff: Handoff, owners: dict[str, str]) -> None:
        if handoff.planned_at_s == self._round_started_s:
            return  # planned from these very rows this round
        queues = set(self._view.queues)
        fixed = self._assign(owners).owners
        # Every slot the plan has (a shared queue has several), and every queue: a queue
        # without any owner is not settled even if no plan is possible (no members).
        slots = queues | set(fixed) if self._view.is_agreed else queues
        current = {slot: owners.get(slot) for slot in sorted(slots)}
        settled = is_settled(
            current,
            members=self._view.members,
            is_agreed=self._view.is_agreed,
            fixed=lambda: fixed,
        )
        draining = {s for s in self._holdings.releasing if base_of(s) in queues}
        # A queue we are still draining frees its row later: keep following until it has.
        if settled and not draining:
            # What the rows say is what everyone keeps now; a plan of ours made from other
            # rows or another view must not release anything later.
            self._target = frozenset(q for q, owner in current.items() if owner == self.instance_id)
            self._handoff = None
            logger.info("handoff complete", extra={"mine": len(self._target)})
            return
        self._take_orphans(handoff, current)
        stalled_s = handoff.stalled_for_s(owners, self._round_started_s)
        if stalled_s is None:
            return
        if (
            stalled_s >= STALL_ROUNDS * self._interval_s
            and self._round_started_s >= self._release_at_s
        ):
            logger.warning("handoff stalled; planning again from the ownership rows")
            self._planning = self._load  # the latest figures: the pinned ones did not settle
            self._plan(owners)
            handoff.unchanged_since_s = self._round_started_s

    def _take_orphans(self, handoff: Handoff, current: dict[str, str | None]) -> None:
        """Rows free for ORPHAN_ROUNDS: plans disagreed on who takes them; take them if we
        have room (several may try: the conditional acquire lets one win)."""
        orphans = handoff.orphans(current, self._round_started_s, ORPHAN_ROUNDS * self._interval_s)
        room = capacity(
            queue_count=len(current),
            member_count=max(1, len(self._view.members)),
            load_factor=self._settings.load_factor,
        ) - len(self._target)
        taken = [q for q in orphans if q not in self._target][: max(0, room)]
        if taken:
            logger.warning("taking queues no one took", extra={"queues": len(taken)})
            self._target |= frozenset(taken)

    def _give_up_untargeted(self) -> None:
        if self._round_started_s < self._release_at_s:
            return
        leaving = set(self._holdings.leases) - self._target - self._holdings.releasing
        if not leaving:
            return
        self._holdings.releasing |= leaving
        self._push_owned()

    def _try_acquire(self, wanted: list[tuple[str, OwnershipRecord | None]]) -> None:
        """Take the rows of `wanted` we may take now, each conditional on its row as read."""
        takes = [(q, row) for q, row in wanted if self._may_take(q, row)]
        took = self._leases.acquire_many(
            [(q, self._queues[base_of(q)].url, row) for q, row in takes]
        )
        for (queue, row), landed in zip(takes, took, strict=False):
            # Said only once it landed: a stale copy of a row its owner released before
            # leaving looks the same, and then the conditional acquire fails.
            if landed and row is not None and row.owner not in (None, self.instance_id):
                logger.warning(
                    "took over a queue from a dead instance",
                    extra={"queue": queue, "instance": row.owner},
                )

    def _may_take(self, queue: str, row: OwnershipRecord | None) -> bool:
        missing_since = self._ownership.missing_since.get(queue)
        vanished_s = None if missing_since is None else self._round_started_s - missing_since
        if row is None and vanished_s is not None and vanished_s < self._vanished_wait_s:
            return False  # a row we saw vanish: its holder may still consume (see _sweep)
        owner = row.owner if row is not None and row.owner != self.instance_id else None
        # An owner alive drains the queue and releases the row: leave it until then.
        return not owner or (self._liveness.is_dead(owner) and self._peers.confirm_dead(owner))

    def reconcile_released(self) -> None:
        """Release what the engine drained, and announce it now: the planned owner reads
        the shard at its next round instead of one round after our next."""
        with self._lock:
            if not (self._holdings.drained or self._holdings.unused):
                return
            self._leases.settle_drained(self._url_of)
            try:
                self._ownership.announce()
            except Exception as exc:  # announced again at the end of the next round
                logger.warning("could not announce releases", extra={"error": describe_error(exc)})

    def _retry_releases(self) -> None:
        self._leases.retry_releases(self._url_of, self._has_time)

    def _url_of(self, queue: str) -> str | None:
        """A known queue's URL; None for one that is gone (its row is deleted, not freed)."""
        info = self._queues.get(base_of(queue))
        return info.url if info is not None else None

    def _push_owned(self) -> None:
        """The engine consumes a queue while we hold any of its slots (replicas.py)."""
        holdings = self._holdings
        consuming = {base_of(slot) for slot in holdings.consuming}
        # A slot given up while we consume its queue through another has nothing to drain
        # (the engine goes on): release it now, or it would wait for ever.
        holdings.unused |= {s for s in holdings.releasing if base_of(s) in consuming}
        self._set_owned([self._queues[q] for q in sorted(consuming) if q in self._queues])

    def _known_slots(self) -> set[str]:
        """Rows the sweep keeps: known queues, the slots of our last plan, ours. A free
        replica row nobody plans (a queue shared no more) is stale: deleted."""
        planned = set(self._assigned[1].owners) if self._assigned is not None else set()
        slots = planned | set(self._holdings.leases) | set(self._holdings.unreleased)
        return set(self._queues) | {s for s in slots if base_of(s) in self._queues}

    # -- fencing --------------------------------------------------------------------------

    def receive_budget_s(self) -> float | None:
        return self._fence.receive_budget_s()

    def renewal_due_in_s(self) -> float | None:
        return self._fence.renewal_due_in_s()

    def _check_fence(self) -> None:
        with self._lock:  # verifying changes the holdings (and reads the table)
            self._fence.check(self._verify_after_fence)

    def _verify_after_fence(self) -> bool:
        if not self._leases.drop_lost():
            return False
        self._push_owned()
        return True

    # -- views ----------------------------------------------------------------------------

    @property
    def is_fenced(self) -> bool:
        return self._fence.is_fenced

    @property
    def is_following_handoff(self) -> bool:
        """True from a plan until the rows settle."""
        return self._handoff is not None

    def snapshot(self) -> CoordinationStats:
        renewed = self._fence.renewed_at_s
        return CoordinationStats(
            mode="dynamodb",
            is_registered=self._membership.is_registered,
            members_alive=len(self._view.members),
            heartbeat_age_s=None if renewed is None else self._clock.monotonic() - renewed,
            rebalances=self._rebalances,
            is_fenced=self._fence.is_fenced,
            unowned_queues=self._unowned,
            **self._load_stats(),
        )

    def _load_stats(self) -> dict[str, Any]:
        published = self._published
        if published is None:
            return {}
        assigned = self._assigned[1].replicas if self._assigned is not None else {}
        return {
            "utilisation": published.utilisation,
            "queue_loads": {
                s.queue: s.handler_s_per_s
                for s in published.queues
                if s.handler_s_per_s > loadsummary.MIN_LOAD
            },
            "replicas": dict(assigned),
        }


def _history(row: OwnershipRecord | None) -> tuple[float, float]:
    """What of a row the load planner reads besides its owner (the dwell), for caching."""
    if row is None:
        return 0.0, -1.0
    return row.updated_at, -1.0 if row.moved_at is None else row.moved_at


def _unavailable(table_name: str, exc: Exception) -> AwsUnavailableError:
    """DynamoDB failed us at start (after botocore's retries): say which, in one line."""
    if is_transient(exc):
        return AwsUnavailableError(
            f'DynamoDB unreachable (table "{table_name}"): {describe_error(exc)}'
        )
    return AwsUnavailableError(
        f'DynamoDB refused a request on table "{table_name}": {describe_error(exc)}'
    )
