"""A small, fast model of a fleet under skewed load, for the load-aware planner.

No tables, no clients: each round every instance serves its queues' demand (split evenly
over a queue's owners, capped at its workers), publishes the real encoded load summary,
and the next plan is computed from the decoded summaries, as every instance would. One
seed decides the Zipf ranks, the load shifts and the measurement noise.

Load over time: Zipf(1) demand over the queues; every ``shift_every_s`` a handful of the
hottest tenants trade places with cooler ones (half of them with warm ones); the total
swings ±20% over the hour; each measurement carries ±``noise`` multiplicative noise.
Membership: one instance joins at 40% of the run and one leaves at 70%.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sqsbalancerd.coordination import loadsummary
from sqsbalancerd.coordination.loadplan import MemberLoad, Move, Owners, PlanSettings, plan
from sqsbalancerd.coordination.ring import rebalance


@dataclass(frozen=True, slots=True)
class WorldSettings:
    seed: int = 13
    queues: int = 1000
    instances: int = 20
    workers: int = 16
    mean_utilisation: float = 0.6
    duration_s: float = 3600.0
    warmup_s: float = 1800.0  # static load before the measured run starts
    round_s: float = 30.0
    shift_every_s: float = 600.0
    shifted_tenants: int = 6
    noise: float = 0.05
    membership_changes: bool = True


@dataclass(slots=True)
class RoundFigures:
    time_s: float
    max_over_mean: float  # of demand utilisation, over the owners this round served with
    moves: int
    is_reacting: bool  # a load shift or membership change happened at most a round ago
    most_owners: int


@dataclass(slots=True)
class RunFigures:
    rounds: list[RoundFigures] = field(default_factory=list)
    moves_by_queue: dict[str, list[tuple[Owners, Owners]]] = field(default_factory=dict)
    # At the end: queues still shared although their demand is below one worker's worth.
    cool_but_shared: list[str] = field(default_factory=list)

    def replica_shrinks(self) -> int:
        return sum(
            1
            for moves in self.moves_by_queue.values()
            for before, after in moves
            if 1 <= len(after) < len(before)
        )

    @property
    def worst_max_over_mean(self) -> float:
        return max(r.max_over_mean for r in self.rounds)

    @property
    def worst_settled_max_over_mean(self) -> float:
        """The worst round that is not the one reacting to a change it could not foresee."""
        return max(r.max_over_mean for r in self.rounds if not r.is_reacting)

    def share_within(self, bound: float) -> float:
        return sum(1 for r in self.rounds if r.max_over_mean <= bound) / len(self.rounds)

    @property
    def mean_max_over_mean(self) -> float:
        return sum(r.max_over_mean for r in self.rounds) / len(self.rounds)

    def moves_per_hour(self, duration_s: float) -> float:
        return sum(r.moves for r in self.rounds) * 3600.0 / duration_s

    def flaps(self) -> int:
        """Moves that undo the queue's previous move (A -> B, then B -> A)."""
        count = 0
        for moves in self.moves_by_queue.values():
            count += sum(1 for a, b in itertools.pairwise(moves) if b[1] == a[0])
        return count

    def most_moves_of_one_queue(self) -> int:
        return max((len(m) for m in self.moves_by_queue.values()), default=0)


Planner = Callable[["LoadWorld", float], dict[str, Owners]]


class LoadWorld:
    """The fleet, its demand and its current plan; `run` steps it round by round."""

    def __init__(self, settings: WorldSettings, plan_settings: PlanSettings | None = None) -> None:
        self.settings = settings
        self.plan_settings = plan_settings or PlanSettings()
        self.last_moves: tuple[Move, ...] = ()
        self.rng = random.Random(settings.seed)
        # Its own stream, so both planners see the same load shifts.
        self.noise_rng = random.Random(settings.seed + 1)
        self.queue_names = [f"tenant-{i:04d}" for i in range(settings.queues)]
        ranks = list(range(1, settings.queues + 1))
        self.rng.shuffle(ranks)
        harmonic = sum(1 / r for r in ranks)
        total = settings.mean_utilisation * settings.instances * settings.workers
        self.base = {
            q: total / (r * harmonic) for q, r in zip(self.queue_names, ranks, strict=True)
        }
        self.members = {
            f"i-{i:02d}": MemberLoad(settings.workers, 0.0, -1e9) for i in range(settings.instances)
        }
        self.owners: dict[str, Owners] = {
            q: (m,) for q, m in rebalance(self.queue_names, list(self.members), {}).items()
        }
        self.moved_at_s: dict[str, float] = {}
        self.summaries: dict[str, loadsummary.LoadSummary] = {}
        self.backlogs: dict[str, int] = {}

    def demand(self, queue: str, now_s: float) -> float:
        swing = 1.0 + 0.2 * math.sin(2 * math.pi * max(0.0, now_s) / 3600.0)
        return self.base[queue] * swing

    def shift_load(self) -> None:
        """A few of the hottest tenants trade demand with cooler ones. The very hottest (shared
        by several owners) always with a warm queue: still loaded, so its replicas must be
        shrunk by the planner rather than vanish with idleness; every other turn also."""
        by_demand = sorted(self.queue_names, key=lambda q: (-self.base[q], q))
        hottest, warm = by_demand[:50], by_demand[100:300]
        for turn in range(self.settings.shifted_tenants):
            cooler = warm if turn % 2 == 0 else self.queue_names
            hot = by_demand[0] if turn == 0 else self.rng.choice(hottest)
            cool = self.rng.choice(cooler)
            self.base[hot], self.base[cool] = self.base[cool], self.base[hot]

    def serve(self, now_s: float) -> float:
        """One interval of work: update summaries; return max/mean demand utilisation."""
        demand_by_member = dict.fromkeys(self.members, 0.0)
        for queue, owners in self.owners.items():
            for owner in owners:
                if owner in demand_by_member:  # a leaver's queues wait for the next plan
                    demand_by_member[owner] += self.demand(queue, now_s) / len(owners)
        workers = self.settings.workers
        self.summaries = {
            m: self._summary(m, demand_by_member[m], now_s) for m in sorted(self.members)
        }
        ratios = [d / workers for d in demand_by_member.values()]
        return max(ratios) / (sum(ratios) / len(ratios))

    def _summary(self, member: str, demand: float, now_s: float) -> loadsummary.LoadSummary:
        served = min(1.0, self.settings.workers / demand) if demand > 0 else 1.0
        samples = []
        for queue in owners_of(self.owners, member):
            share = self.demand(queue, now_s) / len(self.owners[queue]) * served
            noisy = share * (1 + self.noise_rng.uniform(-self.settings.noise, self.settings.noise))
            backlog = 0 if served >= 1.0 else 100
            samples.append(loadsummary.QueueSample(queue, noisy, noisy * 20, backlog))
        utilisation = min(1.0, demand / self.settings.workers)
        return loadsummary.LoadSummary(utilisation, tuple(samples))

    def published(self) -> dict[str, loadsummary.LoadSummary]:
        """Each member's summary as another instance reads it back from the row."""
        shared = frozenset(q for q, o in self.owners.items() if len(o) > 1)
        return {
            m: loadsummary.decode(loadsummary.encode(s, shared=shared))
            for m, s in self.summaries.items()
        }

    def change_membership(self, now_s: float, *, joined: bool) -> None:
        if joined:
            name = f"i-{len(self.members):02d}"
            self.members[name] = MemberLoad(self.settings.workers, 0.0, now_s)
        else:
            del self.members[sorted(self.members)[0]]


def load_aware(world: LoadWorld, now_s: float) -> dict[str, Owners]:
    rows = world.published()
    members = {
        m: MemberLoad(row.workers, rows[m].utilisation, row.joined_at_s)
        for m, row in world.members.items()
    }
    summaries = [rows[m] for m in sorted(members)]
    loads = loadsummary.queue_loads(summaries, world.backlogs)
    world.backlogs = loadsummary.backlogs(summaries)
    result = plan(
        world.queue_names,
        loads,
        members,
        world.owners,
        world.moved_at_s,
        now_s=now_s,
        settings=world.plan_settings,
    )
    world.moved_at_s = result.moved_at_s
    world.last_moves = result.moves
    return result.owners


def count_based(world: LoadWorld, now_s: float) -> dict[str, Owners]:
    current = {q: o[0] for q, o in world.owners.items() if o}
    placed = rebalance(world.queue_names, list(world.members), current)
    return {q: (m,) for q, m in placed.items()}


def run(
    settings: WorldSettings, planner: Planner, plan_settings: PlanSettings | None = None
) -> RunFigures:
    """Warm up on static load, then the measured run; figures for the measured part."""
    world = LoadWorld(settings, plan_settings)
    figures = RunFigures()
    steps = int((settings.warmup_s + settings.duration_s) / settings.round_s)
    last_event_s = -math.inf
    for step in range(steps):
        now_s = step * settings.round_s - settings.warmup_s
        if _events(world, settings, now_s):
            last_event_s = now_s
        ratio = world.serve(now_s)
        owners = planner(world, now_s)
        if now_s >= 0:
            _record(figures, world.owners, owners, now_s, ratio)
            figures.rounds[-1].is_reacting = now_s - last_event_s <= 2 * settings.round_s
        world.owners = owners
    end_s = settings.duration_s
    figures.cool_but_shared = [
        q for q, o in sorted(world.owners.items()) if len(o) > 1 and world.demand(q, end_s) < 1.0
    ]
    return figures


def _record(
    figures: RunFigures,
    before: Mapping[str, Owners],
    after: Mapping[str, Owners],
    now_s: float,
    ratio: float,
) -> None:
    moves = 0
    for queue, owners in sorted(after.items()):
        previous = before.get(queue, ())
        if set(owners) != set(previous):
            moves += 1
            figures.moves_by_queue.setdefault(queue, []).append((previous, owners))
    most_owners = max(len(o) for o in after.values())
    figures.rounds.append(RoundFigures(now_s, ratio, moves, False, most_owners))


def _events(world: LoadWorld, settings: WorldSettings, now_s: float) -> bool:
    """Apply this round's load shift or membership change; True when there was one."""
    happened = False
    if now_s > 0 and now_s % settings.shift_every_s == 0:
        world.shift_load()
        happened = True
    if not settings.membership_changes:
        return happened
    if now_s == _on_round(0.4 * settings.duration_s, settings):
        world.change_membership(now_s, joined=True)
        happened = True
    if now_s == _on_round(0.7 * settings.duration_s, settings):
        world.change_membership(now_s, joined=False)
        happened = True
    return happened


def _on_round(time_s: float, settings: WorldSettings) -> float:
    return round(time_s / settings.round_s) * settings.round_s


def owners_of(owners: Mapping[str, Owners], member: str) -> list[str]:
    return sorted(q for q, o in owners.items() if member in o)
