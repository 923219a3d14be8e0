"""A deterministic simulation of a sqsbalancerd cluster: one seed decides everything.

N real `DynamoCoordinator`s, each with a fake engine, its own clock (offset, wall skew)
and its own `SimClient` to one `SimDynamoDB`, are stepped directly in simulated time:
a node wakes for its round, when one of its queues finishes draining, when its receive
budget runs out, and for its discovery refreshes. A call's latency moves the world's
clock, so everything else happens "during" it.

Faults, all drawn from the seed: latency, lost requests and lost responses, per-instance
and fleet-wide DynamoDB partitions, throttling, kills, pauses shorter than `fence_margin`,
discovery skew (each instance refreshes on its own schedule while queues come and go),
config skew (another `virtual_nodes`), wall-clock skew (which decides TTL), hand-edited
rows (member row deleted, ownership row deleted, lease removed or made a string).

Invariants, checked after every step:
- exclusive: no two instances allowed to receive from one queue at one instant (allowed =
  process alive, receive budget left, and the queue owned, or draining while the last
  poll it started — cut to the budget it started with — may still run);
- no exit: no instance ends its process (a partition that healed is not a reason);
- settled: once faults stop, within `settle_bound_s` every queue is consumed by exactly
  one instance, and it stays so.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from simdb import Faults, Meter, SimClient, SimDynamoDB, SimTable

from sqsbalancerd.config import CoordinationSettings
from sqsbalancerd.coordination.coordinator import DynamoCoordinator, ReceiveControl
from sqsbalancerd.coordination.loadbalance import Epoch, assign
from sqsbalancerd.coordination.loadsummary import LoadSummary, QueueSample
from sqsbalancerd.coordination.replicas import split
from sqsbalancerd.coordination.table import CoordinationTable
from sqsbalancerd.discovery import DiscoveryResult, QueueInfo
from sqsbalancerd.errors import SqsBalancerError

TABLE = "coordination"
WALL_EPOCH_S = 1_700_000_000.0
DAY_S = 86_400.0


class SimClock:
    """One instance's view of time: world time plus its own offsets."""

    def __init__(self, world: World, *, monotonic_offset_s: float, wall_skew_s: float) -> None:
        self._world = world
        self._monotonic_offset_s = monotonic_offset_s
        self.wall_skew_s = wall_skew_s

    def monotonic(self) -> float:
        return self._world.now + self._monotonic_offset_s

    def wall(self) -> float:
        return WALL_EPOCH_S + self._world.now + self.wall_skew_s


@dataclass
class SimEngine:
    """What the coordinator tells the engine, and what the engine may receive from."""

    world: World
    rng: random.Random
    owned: set[str] = field(default_factory=set)
    wanted: set[str] = field(default_factory=set)
    draining: dict[str, float] = field(default_factory=dict)  # queue -> drained at (world s)
    # An in-flight poll of a draining queue was cut to the budget it started with: it can
    # receive until then at most (world s).
    poll_ends: dict[str, float] = field(default_factory=dict)
    is_paused: bool = False
    polls_end_s: float = 0.0
    budget: Callable[[], float | None] = lambda: None
    # The slots (coordination/replicas.py) the coordinator holds, and for each queue the
    # one we receive under: the exclusivity check is per (queue, replica).
    slots: Callable[[], set[str]] = set
    slot_of: dict[str, str] = field(default_factory=dict)

    def set_owned(self, queues: Iterable[QueueInfo]) -> None:
        self.wanted = {q.name for q in queues}
        held: dict[str, str] = {}
        for slot in sorted(self.slots(), key=lambda s: split(s)[1], reverse=True):
            held[split(slot)[0]] = slot  # the lowest index wins
        self.slot_of.update({q: held[q] for q in self.wanted if q in held})
        for name in sorted(self.owned - self.wanted):
            self.owned.discard(name)
            # An in-flight long poll may run up to its wait before the queue is drained.
            self._drain(name, self.rng.uniform(0.0, 3.0))
        for name in sorted(self.wanted - self.owned):
            if name not in self.draining:
                self.owned.add(name)

    def pause(self) -> None:
        # Polls in flight were cut to the budget they started with: none outlives it.
        budget = self.budget()
        self.polls_end_s = self.world.now + (float("inf") if budget is None else max(0, budget))
        self.is_paused = True

    def resume(self) -> None:
        self.is_paused = False

    def set_budget(
        self,
        budget: Callable[[], float | None],
        renewal_due_in_s: Callable[[], float | None] | None = None,
    ) -> None:
        self.budget = budget

    def control(self) -> ReceiveControl:
        return ReceiveControl(pause=self.pause, resume=self.resume, set_budget=self.set_budget)

    def queue_gone(self, name: str) -> None:
        """The poller got QueueDoesNotExist: stop it and drain (consumer._queue_gone)."""
        self.wanted.discard(name)
        if name in self.owned:
            self.owned.discard(name)
            self._drain(name, self.rng.uniform(0.0, 1.0))

    def _drain(self, name: str, takes_s: float) -> None:
        budget = self.budget()
        self.draining[name] = self.world.now + takes_s
        left_s = takes_s if budget is None else min(takes_s, max(0.0, budget))
        self.poll_ends[name] = self.world.now + left_s

    def drained_now(self) -> list[str]:
        """Queues whose drain finished; one wanted again starts again instead (consumer)."""
        done = sorted(q for q, at in self.draining.items() if at <= self.world.now)
        released = []
        for name in done:
            del self.draining[name]
            self.poll_ends.pop(name, None)
            if name in self.wanted:
                self.owned.add(name)
            else:
                released.append(name)
        return released

    def allowed(self) -> set[str]:
        budget = self.budget()
        if budget is not None and budget <= 0:
            return set()
        polling = {q for q in self.draining if self.poll_ends.get(q, 0.0) > self.world.now}
        if self.is_paused and self.world.now >= self.polls_end_s:
            return polling
        return self.owned | polling

    def occupied(self) -> set[str]:
        """The slots we may receive under now: one per receivable queue."""
        return {self.slot_of.get(q, q) for q in self.allowed()}

    def consuming(self) -> set[str]:
        budget = self.budget()
        if self.is_paused or (budget is not None and budget <= 0):
            return set()
        return set(self.owned)


@dataclass
class Node:
    instance_id: str
    clock: SimClock
    client: SimClient
    engine: SimEngine
    coordinator: DynamoCoordinator
    discovery_every_s: float
    next_discovery_s: float
    next_round_s: float = 0.0
    is_alive: bool = True
    paused_until_s: float = 0.0
    exits: list[str] = field(default_factory=list)


@dataclass
class Violation:
    at_s: float
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"t={self.at_s:.2f} {self.kind}: {self.detail}"


@dataclass
class Settings:
    """What one schedule runs with (drawn from the seed by `Scenario`)."""

    coordination: CoordinationSettings
    discovery_interval_s: float = 60.0
    skewed: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> setting changes
    # Load-aware runs: each queue's demand in handler-s/s (None: nodes publish no load and
    # the cluster plans by count, as before).
    demand: Callable[[str], float] | None = None
    workers: int = 8


def is_load_move_pending(node: Node, world: World, rows_changed_s: float) -> bool:
    """Load-aware planning has not settled yet: the node's latest complete epoch was
    measured before the ownership rows last changed (world time `rows_changed_s`), or
    planning from it once every dwell and ramp is over would still move a queue."""
    coordinator = node.coordinator
    context = coordinator._load
    if coordinator._load_source is None:
        return False
    clock = world.nodes.get(context.epoch.token.split(":")[0]) if context else None
    if context is None or clock is None:
        return True
    started_s = context.epoch.now_s - WALL_EPOCH_S - clock.clock.wall_skew_s
    if started_s <= rows_changed_s:
        return True
    later = replace(context, epoch=Epoch(context.epoch.token, context.epoch.now_s + DAY_S))
    found = assign(
        later,
        queues=coordinator._view.queues,
        members=coordinator._view.members,
        rows=coordinator._rows(),
        owners=coordinator._owners(),
        settings=coordinator._plan_settings,
    )
    return bool(found.moves)


def served_load(engine: SimEngine, world: World) -> LoadSummary:
    """What a node measures: its share of its queues' demand (split evenly over a queue's
    consumers), capped together at its workers (a saturated instance serves no more than
    it can, and under-reports)."""
    settings = world.settings
    assert settings.demand is not None
    consumers = world.consumers()
    wanted = {
        q: settings.demand(q) / max(1, len(consumers.get(q, ())))
        for q in sorted(engine.consuming())
    }
    total = sum(wanted.values())
    scale = min(1.0, settings.workers / total) if total > 0 else 1.0
    samples = tuple(
        QueueSample(q, d * scale, 10 * d * scale, 0) for q, d in wanted.items() if d > 0
    )
    return LoadSummary(min(1.0, total / settings.workers), samples)


class World:
    def __init__(
        self,
        seed: int,
        settings: Settings,
        *,
        page_items: int | None = 3,
        check_every_s: float = 0.0,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self.settings = settings
        self.db = SimDynamoDB(lambda: self.now, page_items=page_items)
        self.db.items[TABLE] = SimTable()
        self.queues: set[str] = set()
        self.nodes: dict[str, Node] = {}
        self._wakes: dict[str, float] = {}  # live node id -> when it next steps
        self._discovered: tuple[frozenset[str], DiscoveryResult] | None = None
        self.retired: list[Node] = []
        self.violations: list[Violation] = []
        self.events: list[tuple[float, str, Callable[[], None]]] = []
        self.faults_end_s = 0.0
        self.settled_since_s: float | None = None
        self.is_checking_settled = False
        self.log: list[str] = []
        # 0: invariants after every step (the fault runs); cost runs of hundreds of
        # instances check once per `check_every_s` of simulated time instead.
        self.check_every_s = check_every_s
        self._checked_at_s = -1.0
        # How long two instances may have received from one queue at once, per queue.
        self._overlap_since: dict[str, float] = {}
        self.longest_overlap_s: dict[str, float] = {}
        self.most_replicas: dict[str, int] = {}  # queue -> the most replicas any plan gave

    # -- building ---------------------------------------------------------------------------

    def at(self, when_s: float, label: str, action: Callable[[], None]) -> None:
        self.events.append((when_s, label, action))
        self.events.sort(key=lambda e: e[0])

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    def add_node(self, instance_id: str, *, wall_skew_s: float = 0.0) -> Node | None:
        changes = self.settings.skewed.get(instance_id, {})
        settings = self.settings.coordination.model_copy(update=changes)
        clock = SimClock(
            self,
            monotonic_offset_s=self.rng.uniform(0, 10_000),
            wall_skew_s=wall_skew_s,
        )
        client = SimClient(self.db, faults=Faults(), sleep=self.sleep)
        engine = SimEngine(self, random.Random(self.rng.random()))
        exits: list[str] = []
        sim = self.settings
        load = None if sim.demand is None else (lambda: served_load(engine, self))
        coordinator = DynamoCoordinator(
            table=CoordinationTable(client, table_name=TABLE, application="sim", clock=clock),  # type: ignore[arg-type]
            settings=settings,
            instance_id=instance_id,
            region="us-east-1",
            clock=clock,
            set_owned=engine.set_owned,
            control=engine.control(),
            spawn=lambda name, run, stop: None,
            fail=exits.append,
            load_source=load,
            workers=sim.workers,
        )
        engine.slots = lambda: coordinator._holdings.consuming
        every = self.settings.discovery_interval_s
        node = Node(
            instance_id, clock, client, engine, coordinator, every, self.now + every, exits=exits
        )
        try:
            coordinator.start()
        except SqsBalancerError as exc:
            self.note(f"{instance_id} could not start: {exc}")
            return None
        coordinator.on_discovered(self.discovery())
        node.next_round_s = self.now + settings.heartbeat_interval
        self.nodes[instance_id] = node
        self.note(f"{instance_id} joined")
        return node

    def discovery(self) -> DiscoveryResult:
        queues = frozenset(self.queues)
        if self._discovered is None or self._discovered[0] != queues:
            matched = tuple(QueueInfo(name=n, url=f"http://sqs/{n}") for n in sorted(queues))
            self._discovered = (queues, DiscoveryResult(matched=matched, skipped=()))
        return self._discovered[1]

    def note(self, text: str) -> None:
        self.log.append(f"t={self.now:.2f} {text}")

    # -- stepping ---------------------------------------------------------------------------

    def _wake_at(self, node: Node) -> float:
        times = [node.next_round_s, node.next_discovery_s, *node.engine.draining.values()]
        budget = node.coordinator.receive_budget_s()
        if budget is not None and budget > 0 and not node.coordinator.is_fenced:
            times.append(self.now + budget + 1e-6)
        return max(min(times), node.paused_until_s)

    def _next_wake(self) -> tuple[float, str] | None:
        """The earliest node wake-up. A node's wake time changes only when it steps or an
        event runs (both forget it), so it is remembered between (hundreds of instances)."""
        wakes = self._wakes
        for node in self.nodes.values():
            if node.is_alive and node.instance_id not in wakes:
                wakes[node.instance_id] = self._wake_at(node)
        return min(((t, i) for i, t in wakes.items()), default=None)

    def run_until(self, end_s: float) -> None:
        self._wakes.clear()  # callers may have changed nodes since the last run
        while True:
            wake = self._next_wake()
            next_event = self.events[0][0] if self.events else float("inf")
            next_wake = wake[0] if wake else float("inf")
            when = min(next_event, next_wake)
            if when > end_s:
                self.now = max(self.now, end_s)
                self.check()
                return
            self.now = max(self.now, when)
            if next_event <= next_wake:
                _, label, action = self.events.pop(0)
                self.note(label)
                action()
                self._wakes.clear()
            elif wake is not None:
                self._wakes.pop(wake[1], None)
                self.step(self.nodes[wake[1]])
                self._wakes.pop(wake[1], None)
            if self.now - self._checked_at_s >= self.check_every_s:
                self.check()

    def step(self, node: Node) -> None:
        """One pass of the coordinator's run loop, plus the engine's and discovery's."""
        coordinator = node.coordinator
        if self.now >= node.next_discovery_s:
            node.next_discovery_s = self.now + node.discovery_every_s
            coordinator.on_discovered(self.discovery())
        for name in sorted(node.engine.owned - self.queues):
            node.engine.queue_gone(name)
        for name in node.engine.drained_now():
            coordinator.on_released(name)
        if self.now >= node.next_round_s:
            node.next_round_s = self.now + coordinator._settings.heartbeat_interval
            coordinator.tick()
        else:
            coordinator.reconcile_released()
            coordinator._check_fence()
        if node.exits:
            self.violate("exit", f"{node.instance_id}: {node.exits[-1]}")
            self.kill(node.instance_id, note="exited")

    # -- faults -----------------------------------------------------------------------------

    def kill(self, instance_id: str, *, note: str = "killed") -> None:
        node = self.nodes.get(instance_id)
        if node is None or not node.is_alive:
            return
        node.is_alive = False
        node.engine.owned.clear()
        node.engine.draining.clear()
        self.retired.append(self.nodes.pop(instance_id))
        self._wakes.pop(instance_id, None)
        self.note(f"{instance_id} {note}")

    def leave(self, instance_id: str) -> None:
        """Graceful shutdown as runtime.py orders it (drain, then release and leave)."""
        node = self.nodes.get(instance_id)
        if node is None:
            return
        node.engine.set_owned([])
        node.coordinator.begin_drain()
        node.engine.draining.clear()
        try:
            node.coordinator.leave()
        except Exception as exc:  # app.finish: best effort
            self.note(f"{instance_id} could not leave cleanly: {exc!r}")
        self.kill(instance_id, note="left")

    # -- invariants -------------------------------------------------------------------------

    def violate(self, kind: str, detail: str) -> None:
        self.violations.append(Violation(self.now, kind, detail))

    def check(self) -> None:
        self._checked_at_s = self.now
        holders: dict[str, list[str]] = {}
        sharing: dict[str, list[str]] = {}
        for node in self.nodes.values():
            if node.is_alive:
                for slot in node.engine.occupied():
                    holders.setdefault(slot, []).append(node.instance_id)
                    sharing.setdefault(split(slot)[0], []).append(slot)
        self._time_overlaps({q for q, ids in holders.items() if len(ids) > 1})
        for queue, ids in sorted(holders.items()):
            if len(ids) > 1:
                detail = f"{queue} receivable by {sorted(ids)}"
                if not any(v.kind == "exclusive" and v.detail == detail for v in self.violations):
                    self.violate("exclusive", detail)
        self._check_replicas(sharing)
        if self.is_checking_settled:
            self._check_settled()

    def _check_replicas(self, sharing: dict[str, list[str]]) -> None:
        """No queue receivable under more slots than any plan gave it replicas (two
        instances under one slot are the exclusivity check's)."""
        for node in self.nodes.values():
            assigned = node.coordinator._assigned
            for queue, k in assigned[1].replicas.items() if assigned else ():
                self.most_replicas[queue] = max(self.most_replicas.get(queue, 1), k)
        for queue, slots in sorted(sharing.items()):
            most = self.most_replicas.get(queue, 1)
            if len(set(slots)) > most:
                detail = f"{queue} receivable under {sorted(set(slots))}, at most {most} planned"
                if not any(v.kind == "replicas" and v.detail == detail for v in self.violations):
                    self.violate("replicas", detail)

    def _time_overlaps(self, shared: set[str]) -> None:
        for queue in shared:
            since = self._overlap_since.setdefault(queue, self.now)
            longest = self.longest_overlap_s.get(queue, 0.0)
            self.longest_overlap_s[queue] = max(longest, self.now - since)
        for queue in set(self._overlap_since) - shared:
            del self._overlap_since[queue]

    def consumers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {q: [] for q in self.queues}
        for node in self.nodes.values():
            for queue in node.engine.consuming():
                if queue in out:
                    out[queue].append(node.instance_id)
        return out

    def is_settled(self) -> bool:
        """Every queue has a consumer, and no more than its replicas (one unless shared)."""
        return all(
            1 <= len(ids) <= self.most_replicas.get(q, 1) for q, ids in self.consumers().items()
        )

    def _check_settled(self) -> None:
        if self.is_settled():
            if self.settled_since_s is None:
                self.settled_since_s = self.now
        elif self.settled_since_s is not None:
            self.note("unsettled again")
            self.settled_since_s = None

    def meters(self) -> dict[str, Meter]:
        return {n.instance_id: n.client.meter for n in [*self.nodes.values(), *self.retired]}


def quiet(world: World) -> None:
    """Quieten the harness: the coordinator logs every fault it survives."""
    del world
    logging.getLogger("sqsbalancerd").setLevel(logging.CRITICAL)
