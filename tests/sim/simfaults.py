"""Schedules: from one seed, a cluster, its queues and the faults that hit it.

`run(seed)` builds the world, lets faults happen until `faults_end_s`, heals everything,
and runs on for the settle bound; the result says which invariants broke. A failing seed
replays exactly: `run(seed).log` tells its story.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from simdb import Faults, Meter
from simworld import DAY_S, TABLE, Node, Settings, Violation, World, is_load_move_pending

from sqsbalancerd.config import CoordinationSettings
from sqsbalancerd.coordination.replicas import split
from sqsbalancerd.coordination.sweep import SWEEP_ROUNDS

INTERVAL_S = 10.0  # the defaults: heartbeat_interval, heartbeat_timeout, rebalance_delay
TIMEOUT_S = 30.0
DELAY_S = 30.0
DISCOVERY_S = 60.0
VIRTUAL_NODES = 16  # small rings keep 2,000 schedules fast; the ring itself is tested apart
# Once faults stop: discovery agrees within one refresh, a dead owner is judged within a
# timeout, a plan waits the delay (twice: once more when the queue sets come to agree),
# then a handoff takes a few rounds.
SETTLE_BOUND_S = DISCOVERY_S + TIMEOUT_S + 2 * DELAY_S + 12 * INTERVAL_S
HOLD_S = 4 * INTERVAL_S  # settled must last this long at the end
STALE_HEALED_S = 2.0  # eventually consistent reads lag at most this once faults end

KINDS = (
    "partition_one",
    "outage",
    "lossy",
    "slow",
    "throttle",
    "kill",
    "pause",
    "join",
    "leave",
    "queue_add",
    "queue_del",
    "delete_member_row",
    "delete_ownership_row",
    "corrupt_lease",
)


@dataclass
class Result:
    seed: int
    violations: list[Violation]
    settled_after_s: float | None  # after faults stopped
    log: list[str]
    meters: dict[str, Meter]
    faults: list[str] = field(default_factory=list)
    longest_overlap_s: dict[str, float] = field(default_factory=dict)  # queue -> s
    most_replicas: dict[str, int] = field(default_factory=dict)  # shared queues -> most k

    @property
    def kinds(self) -> set[str]:
        return {v.kind for v in self.violations}


def coordination(**changes: Any) -> CoordinationSettings:
    values: dict[str, Any] = {
        "table_name": TABLE,
        "heartbeat_interval": INTERVAL_S,
        "heartbeat_timeout": TIMEOUT_S,
        "rebalance_delay": DELAY_S,
        "virtual_nodes": VIRTUAL_NODES,
        "balance": "count",  # the schedules planning by load run in test_load_wiring.py
        **changes,
    }
    return CoordinationSettings(**values)


class Schedule:
    """Draws one schedule from `rng` into `world`."""

    def __init__(self, world: World, *, kinds: tuple[str, ...] = KINDS) -> None:
        self.world = world
        self.rng = world.rng
        self.kinds = kinds
        self.counter = 0
        self.faults: list[str] = []
        self.healers: list[Callable[[], None]] = []

    def new_id(self) -> str:
        self.counter += 1
        return f"i{self.counter:02d}"

    def live_ids(self) -> list[str]:
        return sorted(n.instance_id for n in self.world.nodes.values() if n.is_alive)

    def pick(self) -> str | None:
        ids = self.live_ids()
        return self.rng.choice(ids) if ids else None

    def build(self, faults_end_s: float) -> None:
        world, rng = self.world, self.rng
        world.queues = {f"q-{index:02d}" for index in range(rng.randint(3, 14))}
        skews = []
        for _ in range(rng.randint(2, 5)):
            instance_id = self.new_id()
            is_behind = ("wall_behind" in self.kinds and not skews) or (
                self.kinds == KINDS and rng.random() < 0.03
            )
            skew = -DAY_S - rng.uniform(0, 3600) if is_behind else rng.uniform(-5, 5)
            skews.append(skew)
            start = rng.uniform(0, 20)
            world.at(start, f"start {instance_id}", lambda i=instance_id, s=skew: self.join(i, s))
        faulty = [k for k in self.kinds if k in KINDS]
        for _ in range(rng.randint(0, 6) if faulty else 0):
            kind = rng.choice(faulty)
            start = rng.uniform(25, faults_end_s)
            duration = min(rng.uniform(5, 120), faults_end_s - start)
            world.at(start, f"fault {kind}", lambda k=kind, d=duration: self.fault(k, d))
        if any(skew < -DAY_S / 2 for skew in skews):
            for tick in range(30, int(faults_end_s + SETTLE_BOUND_S + HOLD_S), 30):
                world.at(float(tick), "ttl sweep", self.ttl_sweep)

    def join(self, instance_id: str, wall_skew_s: float = 0.0) -> None:
        self.world.add_node(instance_id, wall_skew_s=wall_skew_s)

    def fault(self, kind: str, duration_s: float) -> None:
        target = self.pick()
        self.faults.append(f"t={self.world.now:.1f} {kind} {target} {duration_s:.1f}s")
        getattr(self, f"_{kind}")(target, duration_s)

    def heal_later(self, duration_s: float, heal: Callable[[], None]) -> None:
        self.healers.append(heal)
        self.world.at(self.world.now + duration_s, "heal", heal)

    def faults_of(self, instance_id: str | None) -> Faults | None:
        node = self.world.nodes.get(instance_id or "")
        return node.client.faults if node else None

    def _set(self, instance_id: str | None, duration_s: float, **values: Any) -> None:
        faults = self.faults_of(instance_id)
        if faults is None:
            return
        for name, value in values.items():
            setattr(faults, name, value)
        defaults = Faults()
        self.heal_later(
            duration_s, lambda: [setattr(faults, n, getattr(defaults, n)) for n in values]
        )

    # -- the faults -------------------------------------------------------------------------

    def _partition_one(self, target: str | None, duration_s: float) -> None:
        self._set(target, duration_s, is_partitioned=True)

    def _outage(self, target: str | None, duration_s: float) -> None:
        for instance_id in self.live_ids():
            self._set(instance_id, duration_s, is_partitioned=True)

    def _lossy(self, target: str | None, duration_s: float) -> None:
        rng = random.Random(self.rng.random())
        p = rng.uniform(0.1, 0.6)
        self._set(
            target,
            duration_s,
            lose_request=lambda: rng.random() < p,
            lose_response=lambda: rng.random() < p,
        )

    def _slow(self, target: str | None, duration_s: float) -> None:
        rng = random.Random(self.rng.random())
        self._set(target, duration_s, latency_s=lambda: rng.uniform(0.0, 2.5))

    def _throttle(self, target: str | None, duration_s: float) -> None:
        rng = random.Random(self.rng.random())
        p = rng.uniform(0.3, 1.0)
        self._set(target, duration_s, throttle=lambda method: rng.random() < p)

    def _kill(self, target: str | None, duration_s: float) -> None:
        if target is None or len(self.live_ids()) < 2:
            return
        self.world.kill(target)
        if self.rng.random() < 0.7:
            replacement = self.new_id()
            self.world.at(
                self.world.now + duration_s / 4,
                f"start {replacement}",
                lambda: self.join(replacement),
            )

    def _pause(self, target: str | None, duration_s: float) -> None:
        node = self.world.nodes.get(target or "")
        if node is not None:
            margin = node.coordinator._settings.effective_fence_margin
            node.paused_until_s = self.world.now + self.rng.uniform(0.5, 0.9 * margin)

    def _join(self, target: str | None, duration_s: float) -> None:
        self.join(self.new_id())

    def _leave(self, target: str | None, duration_s: float) -> None:
        if target is not None and len(self.live_ids()) >= 2:
            self.world.leave(target)

    def _queue_add(self, target: str | None, duration_s: float) -> None:
        self.world.queues.add(f"q-new-{self.world.now:.0f}")

    def _queue_del(self, target: str | None, duration_s: float) -> None:
        if len(self.world.queues) > 1:
            self.world.queues.discard(self.rng.choice(sorted(self.world.queues)))

    def _rows(self, prefix: str) -> list[tuple[str, str]]:
        return sorted(k for k in self.world.db.items[TABLE] if k[1].startswith(prefix))

    def _delete_member_row(self, target: str | None, duration_s: float) -> None:
        rows = [k for k in self._rows("member#") if k[1] == f"member#{target}"]
        for key in rows:
            del self.world.db.items[TABLE][key]

    def _delete_ownership_row(self, target: str | None, duration_s: float) -> None:
        rows = self._rows("queue#")
        if rows:
            del self.world.db.items[TABLE][self.rng.choice(rows)]

    def _corrupt_lease(self, target: str | None, duration_s: float) -> None:
        rows = self._rows("queue#")
        if rows:
            item = self.world.db.items[TABLE][self.rng.choice(rows)]
            if self.rng.random() < 0.5:
                item.pop("lease", None)
            else:
                item["lease"] = {"S": "seven"}

    def ttl_sweep(self) -> None:
        """DynamoDB TTL: an expired member row may go at any time after its `ttl`."""
        wall = 1_700_000_000.0 + self.world.now
        table = self.world.db.items[TABLE]
        for key in sorted(table):
            ttl = table[key].get("ttl")
            if ttl is not None and float(ttl["N"]) < wall and self.rng.random() < 0.5:
                del table[key]
                self.world.note(f"ttl removed {key[1]}")

    def heal_all(self) -> None:
        for heal in self.healers:
            heal()
        for node in self.world.nodes.values():
            node.client.faults = Faults()


def settle_until(world: World, end_s: float) -> None:
    """Run until the cluster is settled for good (or the bound passes): every instance has
    refreshed discovery since the faults ended, none follows a handoff, and every queue
    has had one consumer for a few rounds."""
    writes, written_s = world.db.queue_writes, world.now
    while world.now < end_s + SETTLE_BOUND_S:
        world.run_until(min(world.now + INTERVAL_S, end_s + SETTLE_BOUND_S))
        if world.db.queue_writes != writes:
            writes, written_s = world.db.queue_writes, world.now
        since = world.settled_since_s
        nodes = [n for n in world.nodes.values() if n.is_alive]
        if (
            since is not None
            and world.now - since >= 3 * INTERVAL_S
            and all(n.next_discovery_s - n.discovery_every_s >= end_s for n in nodes)
            and all(swept_since(n, end_s) for n in nodes)
            and not any(n.coordinator.is_following_handoff for n in nodes)
            # No plan pending (a view change still inside its rebalance_delay).
            and all(n.coordinator._applied == n.coordinator._view.key for n in nodes)
            # Planning by load: no balance move left to make (none once dwells end).
            and not any(is_load_move_pending(n, world, written_s) for n in nodes)
        ):
            return


def swept_since(node: Node, since_s: float) -> bool:
    """The node swept after world time `since_s` (what a sweep repairs is part of settling)."""
    coordinator = node.coordinator
    last_sweep = coordinator._next_sweep_s - SWEEP_ROUNDS * coordinator._interval_s
    offset = node.clock.monotonic() - node.clock._world.now
    return last_sweep >= since_s + offset


def check_quiet_table(world: World, writes_before_hold: int) -> None:
    """Settled means quiet: no ownership writes in the hold, no rows of deleted queues."""
    churn = world.db.queue_writes - writes_before_hold
    if churn:
        world.violate("churn", f"{churn} ownership writes while settled")
    stale = sorted(
        sk.removeprefix("queue#")
        for _, sk in world.db.items[TABLE]
        if sk.startswith("queue#") and split(sk.removeprefix("queue#"))[0] not in world.queues
    )
    if stale:
        world.violate("stale_rows", f"ownership rows of deleted queues: {stale[:4]}")


def _draw_stale_reads(world: World, rng: random.Random) -> float:
    """Eventually consistent reads (a stream of its own: the schedule stays the same).
    Most schedules lag as DynamoDB usually does (under a second or two, drawn per read);
    one in six also has a replica stall for longer than the heartbeat timeout, so that
    every live member looks dead to a stale read: nothing may be taken on that verdict."""
    draw = rng.random()
    lag_s = 0.0 if draw < 0.25 else rng.uniform(0.05, STALE_HEALED_S)
    world.db.rng = random.Random(rng.random())
    world.db.allow_stale_reads(lag_s, history_s=2 * TIMEOUT_S + 10)
    if draw > 5 / 6:
        start, duration = rng.uniform(25, 200), rng.uniform(TIMEOUT_S, 2 * TIMEOUT_S)
        db = world.db

        def stall() -> None:
            db.frozen_at_s = world.now

        def catch_up() -> None:
            db.frozen_at_s = None

        world.at(start, "replica stalls", stall)
        world.at(start + duration, "replica catches up", catch_up)
    return lag_s


def run(
    seed: int,
    *,
    kinds: tuple[str, ...] = KINDS,
    settings: Settings | None = None,
    faults_end_s: float | None = None,
) -> Result:
    rng = random.Random(seed)
    end = faults_end_s if faults_end_s is not None else rng.uniform(100, 250)
    # Small pages in one schedule of five (a stream of its own: the schedule stays the same).
    page_items = 3 if random.Random(seed ^ 0x5EED).random() < 0.2 else None
    world = World(seed, settings or Settings(coordination=coordination()), page_items=page_items)
    stale_s = _draw_stale_reads(world, random.Random(seed ^ 0x57A1E))
    schedule = Schedule(world, kinds=kinds)
    schedule.build(end)
    world.run_until(end)
    schedule.heal_all()
    world.db.allow_stale_reads(min(stale_s, STALE_HEALED_S))
    world.faults_end_s = end
    world.is_checking_settled = True
    world.settled_since_s = world.now if world.is_settled() else None
    settle_until(world, end)
    writes_before_hold = world.db.queue_writes
    world.run_until(world.now + HOLD_S)
    since = world.settled_since_s
    if since is None or since > end + SETTLE_BOUND_S:
        unsettled = {q: ids for q, ids in world.consumers().items() if len(ids) != 1}
        world.violate(
            "unsettled", f"{len(unsettled)} queues: {dict(sorted(unsettled.items())[:4])}"
        )
    check_quiet_table(world, writes_before_hold)
    return Result(
        seed=seed,
        violations=world.violations,
        settled_after_s=None if since is None else max(0.0, since - end),
        log=world.log,
        meters=world.meters(),
        faults=schedule.faults,
        longest_overlap_s=world.longest_overlap_s,
        most_replicas={q: k for q, k in world.most_replicas.items() if k > 1},
    )
