"""DynamoDB cost of coordination, computed by the deterministic simulation (tests/sim).

N real coordinators at the default timings over the simulated DynamoDB, 20 queues per
instance; after the cluster settles, a measured window of steady state, then one of a
rolling deploy (a tenth of the instances replaced every minute: graceful leave, new id
joins). The simulated table meters every request in read and write units as DynamoDB
bills them, and the busiest partition's units per second.

    python -m bench.sim_cost 10 30         # markdown table on stdout
    python -m bench.sim_cost 500 --steady-only          # the steady window alone
    python -m bench.sim_cost 500 --deploy-minutes=3     # the deploy's first 3 minutes
    python -m bench.sim_cost 10 30 --balance=load       # load-aware: Zipf demand, summaries

With ``--balance=load`` every instance plans by load (``coordination.balance = "load"``) and
publishes its load summary in its member row each epoch; the queues carry a Zipf demand
(exponent 1.1) worth half of the cluster's workers, so that the member rows hold summaries
of realistic size (the busiest queues listed, up to the 2 KB bound).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests" / "sim")]

from simdb import Meter  # noqa: E402
from simworld import TABLE, Settings, World, quiet  # noqa: E402

from sqsbalancerd.config import CoordinationSettings  # noqa: E402
from sqsbalancerd.coordination import table as table_module  # noqa: E402

QUEUES_PER_INSTANCE = 20
WORKERS = 8  # per simulated instance (simworld's default)
ZIPF_EXPONENT = 1.1
DEMAND_SHARE = 0.5  # the Zipf demand sums to this share of every worker in the cluster
WINDOW_S = 300.0
# On-demand prices, us-east-1 (since November 2024): per million request units.
WRITE_PRICE_PER_MILLION = 0.625
READ_PRICE_PER_MILLION = 0.125
MINUTES_PER_MONTH = 30 * 24 * 60


@dataclass(frozen=True)
class Cost:
    instances: int
    phase: str
    requests_min: float  # per instance per minute
    read_units_min: float
    write_units_min: float
    peak_read_units_s: float  # busiest partition
    peak_write_units_s: float

    @property
    def monthly_usd(self) -> float:
        """The whole cluster, for a month at this rate."""
        per_minute = (
            self.read_units_min * READ_PRICE_PER_MILLION
            + self.write_units_min * WRITE_PRICE_PER_MILLION
        ) / 1e6
        return per_minute * self.instances * MINUTES_PER_MONTH


def _total(world: World) -> Meter:
    total = Meter()
    for meter in world.meters().values():
        total.add(meter)
    return total


def _window(world: World, instances: int, phase: str, seconds: float) -> Cost:
    before = _total(world)
    world.db.peak_units.clear()
    world.run_until(world.now + seconds)
    after = _total(world)
    minutes = seconds / 60.0
    per = instances * minutes
    peaks = world.db.peak_units
    return Cost(
        instances,
        phase,
        sum((after.requests - before.requests).values()) / per,
        (after.read_units - before.read_units) / per,
        (after.write_units - before.write_units) / per,
        max((v for (_, kind), v in peaks.items() if kind == "r"), default=0.0),
        max((v for (_, kind), v in peaks.items() if kind == "w"), default=0.0),
    )


def _parse_once() -> None:
    """Harness speed, not a change to the code under test: with `copy_reads` off an
    unchanged stored item is the same object on every read, so its parse is remembered
    (a write replaces the stored item, so a changed row is parsed again)."""
    for name in ("_member_from_item", "_ownership_from_item"):
        parse = getattr(table_module, name)
        if getattr(parse, "is_remembered", False):
            continue
        memo: dict[int, tuple[object, object]] = {}

        def remembered(item: Any, parse: Any = parse, memo: Any = memo) -> Any:
            hit = memo.get(id(item))
            if hit is not None and hit[0] is item:
                return hit[1]
            if len(memo) > 2_000_000:
                memo.clear()
            record = parse(item)
            memo[id(item)] = (item, record)
            return record

        remembered.is_remembered = True  # type: ignore[attr-defined]
        setattr(table_module, name, remembered)


def _read_once() -> None:
    """Harness speed, as `_parse_once`: hundreds of simulated instances read the same
    unchanged partition each round, and the simulated table answers them with the same
    stored items, so the parsed rows are kept per partition while the items are the same
    objects (each reader still gets its own copy: the coordinator changes its rows)."""
    table_class = table_module.CoordinationTable
    if getattr(table_class.shard_rows, "is_remembered", False):
        return
    memo: dict[str, tuple[tuple[int, ...], list[Any], Any]] = {}

    def parsed(pk: str, items: list[Any], parse: Callable[[list[Any]], Any]) -> Any:
        identity = tuple(map(id, items))
        hit = memo.get(pk)
        if hit is None or hit[0] != identity:
            hit = memo[pk] = (identity, items, parse(items))  # items kept: ids stay unique
        return hit[2]

    def shard_rows(self: Any, shard: int) -> dict[str, Any]:
        pk = f"{self._pk}#{shard:02d}"
        items = list(self._query(table_module.QUEUE_PREFIX, pk=pk))
        parse = table_module._ownership_from_item
        return dict(parsed(pk, items, lambda i: {r.queue: r for r in map(parse, i)}))

    def members(self: Any, *, consistent: bool = True) -> list[Any]:
        items = list(self._query(table_module.MEMBER_PREFIX, consistent=consistent))
        parse = table_module._member_from_item
        return list(parsed(f"{self._pk}/members", items, lambda i: [parse(x) for x in i]))

    shard_rows.is_remembered = True  # type: ignore[attr-defined]
    table_class.shard_rows = shard_rows  # type: ignore[method-assign]
    table_class.members = members  # type: ignore[method-assign]


def zipf_demand(queues: list[str], total: float) -> Callable[[str], float]:
    """Handler-s/s per queue: the i-th busiest carries 1/i^s of the whole, ``total`` in sum."""
    weights = [1.0 / (rank + 1) ** ZIPF_EXPONENT for rank in range(len(queues))]
    scale = total / sum(weights)
    demand = {queue: weight * scale for queue, weight in zip(queues, weights, strict=True)}
    return lambda queue: demand.get(queue, 0.0)


def _settings(instances: int, queues: list[str], balance: str) -> Settings:
    coordination = CoordinationSettings(table_name=TABLE, balance=balance)  # type: ignore[arg-type]
    if balance == "count":
        return Settings(coordination=coordination)
    total = DEMAND_SHARE * WORKERS * instances
    return Settings(coordination=coordination, demand=zipf_demand(queues, total), workers=WORKERS)


def measure(
    instances: int, *, steady_only: bool = False, deploy_minutes: int = 10, balance: str = "count"
) -> list[Cost]:
    _parse_once()
    _read_once()
    queues = [f"q-{i:05d}" for i in range(QUEUES_PER_INSTANCE * instances)]
    world = World(
        1,
        _settings(instances, queues, balance),
        page_items=None,
        check_every_s=1.0,  # hundreds of instances: invariants once a simulated second
    )
    world.db.copy_reads = False
    world.queues = set(queues)
    rng = random.Random(instances)
    ids = [f"i{i:04d}" for i in range(instances)]
    for instance_id in ids:
        world.at(rng.uniform(0, 10), "start", lambda i=instance_id: world.add_node(i))
    world.is_checking_settled = True
    world.run_until(15.0)
    while world.now < 900 and not (
        world.is_settled()
        and not any(n.coordinator.is_following_handoff for n in world.nodes.values())
    ):
        world.run_until(world.now + 10)
    if len(world.nodes) < instances:  # a harness fault, not a cost: say so, loudly
        raise SystemExit(
            f"only {len(world.nodes)} of {instances} instances started: {world.log[-3:]}"
        )
    world.is_checking_settled = False  # settled: the windows need no O(queues) check a second
    costs = [_window(world, instances, "steady", WINDOW_S)]
    if steady_only:  # hundreds of instances: the deploy window takes most of the run
        return costs
    batch = max(1, instances // 10)
    for step in range(deploy_minutes):
        at = world.now + 60.0 * step
        for offset, old in enumerate(ids[step * batch : (step + 1) * batch]):
            new = f"{old}-v2"
            world.at(at + offset * 0.5, "leave", lambda o=old: world.leave(o))
            world.at(at + offset * 0.5 + 5, "join", lambda n=new: world.add_node(n))
    costs.append(_window(world, instances, "rolling deploy", 60.0 * deploy_minutes))
    return costs


def _settled_cluster(
    seed: int, instances: int = 3, queues: int = 12, balance: str = "count"
) -> World:
    names = [f"q-{i:02d}" for i in range(queues)]
    world = World(seed, _settings(instances, names, balance), page_items=None)
    world.queues = set(names)
    rng = random.Random(seed)
    for index in range(instances):
        world.at(rng.uniform(0, 10), "start", lambda i=index: world.add_node(f"i{i}"))
    world.run_until(300.0)
    world.is_checking_settled = True
    return world


def _time_until(world: World, done: Callable[[], bool], limit_s: float = 600.0) -> float:
    started = world.now
    while not done() and world.now - started < limit_s:
        world.run_until(world.now + 0.5)
    return world.now - started


def _has_share(world: World) -> bool:
    return world.is_settled() and len(world.nodes["new"].engine.consuming()) >= 12 // 4


def bounds(seeds: int = 30, balance: str = "count") -> dict[str, float]:
    """Worst case over seeds, at the default timings: a join until the newcomer consumes its
    share, a SIGKILL until every queue is consumed again, a graceful leave likewise."""
    worst = {"join": 0.0, "kill": 0.0, "leave": 0.0}
    for seed in range(seeds):
        world = _settled_cluster(seed, balance=balance)
        world.add_node("new")
        worst["join"] = max(worst["join"], _time_until(world, partial(_has_share, world)))
        world = _settled_cluster(seed, balance=balance)
        world.kill("i0")
        worst["kill"] = max(worst["kill"], _time_until(world, world.is_settled))
        world = _settled_cluster(seed, balance=balance)
        world.leave("i0")
        worst["leave"] = max(worst["leave"], _time_until(world, world.is_settled))
    return worst


def render(costs: list[Cost]) -> str:
    lines = [
        "| instances | queues | phase | requests/instance/min | RCU/instance/min | "
        "WCU/instance/min | busiest partition RCU/s | WCU/s | cluster $/month (on-demand) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in costs:
        lines.append(
            f"| {c.instances} | {c.instances * QUEUES_PER_INSTANCE} | {c.phase} | "
            f"{c.requests_min:.1f} | {c.read_units_min:.1f} | {c.write_units_min:.1f} | "
            f"{c.peak_read_units_s:.0f} | {c.peak_write_units_s:.0f} | {c.monthly_usd:.2f} |"
        )
    return "\n".join(lines)


def _option(argv: list[str], name: str, default: str) -> str:
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")), default)


def main(argv: list[str]) -> None:
    quiet(None)
    balance = _option(argv, "--balance", "count")
    if balance not in ("count", "load"):
        raise SystemExit(f"--balance must be count or load, not {balance!r}")
    if "bounds" in argv:
        for name, seconds in bounds(balance=balance).items():
            print(f"{name}: {seconds:.1f} s (worst of 30 seeds, balance={balance})")
        return
    costs: list[Cost] = []
    steady_only = "--steady-only" in argv
    # --deploy-minutes N: measure the first N minutes of the rolling deploy (a tenth of the
    # instances replaced each minute) instead of all ten; the rate per minute is the figure.
    minutes = int(_option(argv, "--deploy-minutes", "10"))
    argv = [a for a in argv if not a.startswith("--")]
    for count in [int(a) for a in argv] or [10, 30]:
        started = time.monotonic()
        costs.extend(
            measure(count, steady_only=steady_only, deploy_minutes=minutes, balance=balance)
        )
        print(f"{count} instances simulated in {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(render(costs))


if __name__ == "__main__":
    main(sys.argv[1:])
