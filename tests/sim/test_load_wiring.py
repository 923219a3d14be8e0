"""Load-aware planning wired into the real coordinators, in the deterministic simulation.

The nodes publish what they serve (`simworld.served_load`: each queue's demand, capped at
the node's workers) and plan from the rows. Exclusivity is checked after every step, as
in the count-based schedules; on top: the load ends up balanced, and a steady load moves
nothing.
"""

from __future__ import annotations

import os
import zlib

import pytest
from simfaults import KINDS, coordination, run
from simworld import Settings, World, served_load

SEEDS = int(os.environ.get("SQSB_SIM_LOAD_SEEDS", "300"))
CI_KINDS = tuple(kind for kind in KINDS if kind != "delete_ownership_row")  # as test_simulation
SAFETY = {"exclusive", "exit", "replicas"}
QUEUES = [f"tenant-{index:02d}" for index in range(40)]
HOT = {"tenant-03": 3.0, "tenant-11": 2.5, "tenant-17": 2.0, "tenant-29": 2.0}


def demand(queue: str) -> float:
    """Four hot tenants, the rest warm or idle (stable per name, for any queue set)."""
    if queue in HOT:
        return HOT[queue]
    return 0.3 if zlib.crc32(queue.encode()) % 3 == 0 else 0.01


def fault_demand(queue: str) -> float:
    """For the fault schedules' queues (q-00...): one in five hot enough to be shared."""
    crc = zlib.crc32(queue.encode())
    return 2.5 if crc % 5 == 0 else demand(queue)


def _world(balance: str) -> World:
    settings = Settings(
        coordination=coordination(balance=balance, load_interval=30.0, load_min_dwell=60.0),
        demand=demand,
    )
    world = World(5, settings)
    world.queues = set(QUEUES)
    for name in ("a", "b", "c", "d"):
        world.add_node(name)
    return world


def _spread(world: World) -> float:
    """Most loaded node over the mean, by what each serves."""
    loads = [
        sum(s.handler_s_per_s for s in served_load(n.engine, world).queues)
        for n in world.nodes.values()
    ]
    return max(loads) / (sum(loads) / len(loads))


def test_load_aware_planning_balances_what_count_planning_does_not() -> None:
    by_count, by_load = _world("count"), _world("load")
    for world in (by_count, by_load):
        world.run_until(900.0)
        assert not world.violations, world.violations[:3]
        assert world.is_settled(), world.consumers()
    assert _spread(by_count) > 1.3  # the hot tenants' owners are far over the mean
    assert _spread(by_load) <= 1.2


def test_a_steady_load_moves_nothing() -> None:
    world = _world("load")
    world.run_until(900.0)
    writes = world.db.queue_writes
    world.run_until(900.0 + 1800.0)  # sixty epochs
    assert world.db.queue_writes == writes
    assert not world.violations


# The count-based fault schedules, with every node publishing load and planning by it.
@pytest.mark.timeout(max(300, SEEDS))  # ~0.1 s of CPU a schedule
def test_seeded_schedules_hold_every_invariant_when_planning_by_load() -> None:
    settings = Settings(
        coordination=coordination(balance="load", load_interval=30.0, load_min_dwell=60.0),
        demand=fault_demand,
    )
    unsafe, unsettled, shared = [], [], 0
    for seed in range(SEEDS):
        result = run(seed, kinds=CI_KINDS, settings=settings)
        shared += bool(result.most_replicas)
        if not result.violations:
            continue
        line = f"seed {seed}: {result.violations[0]} (faults: {result.faults})"
        (unsafe if result.kinds & SAFETY else unsettled).append(line)
    assert not unsafe, f"{len(unsafe)} of {SEEDS} schedules broke safety:\n" + "\n".join(unsafe)
    assert shared >= SEEDS // 2  # most schedules share a queue: replicas are exercised
    # Liveness: as the count-based runs allow, plus balance moves the ramp or a dwell holds
    # back until past the settle bound (worlds of 3-10 queues where one queue is several
    # fair shares): 7 of 300 at the time of writing, 2 of them failing by count as well.
    assert len(unsettled) <= 0.03 * SEEDS, "\n".join(unsettled)
