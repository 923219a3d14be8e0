"""Simulate queue ownership: plain uhashring, stateless bounded loads, and the daemon's
`rebalance` (bounded loads that keep to the current owners). No AWS.

    python -m bench.ring_sim                    # 10,000 queues over 500 instances
    python -m bench.ring_sim --quick            # small smoke run for CI
    python -m bench.ring_sim --json out.json    # also write the numbers

Prints a Markdown table: spread of owned queues, queues moved on a random join or leave
(against the ideal Q/(N+1) and Q/N), the newcomer's share, the spread after a random walk
of joins and leaves (history matters to `rebalance`), and the small 12/3 and 24/3 cases.
"""

import argparse
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from sqsbalancerd.coordination.ring import assign, capacity, rebalance

SMALL_CASES = ((12, 3), (24, 3))
SMALL_CASE_NAME_SETS = 200
MIN_CHURN_SAMPLES = 5

MODES = ("plain", "stateless", "rebalance")
WALK_STEPS = 100
# (queues, members, current owners) -> owners; only `rebalance` reads the current owners.
Assigner = Callable[[Sequence[str], Sequence[str], Mapping[str, str]], dict[str, str]]


@dataclass(frozen=True, slots=True)
class Spread:
    max_over_mean: float
    min_over_mean: float
    max_owned: int


@dataclass(frozen=True, slots=True)
class Churn:
    samples: int
    moved_mean: float
    ideal_moved: float
    newcomer_share: float | None  # newcomer's queues / mean owned; joins only

    @property
    def moved_over_ideal(self) -> float:
        return self.moved_mean / self.ideal_moved


@dataclass(frozen=True, slots=True)
class SmallCase:
    queue_count: int
    member_count: int
    fixed_names: Spread  # queue-00.. over instance-a/b/c
    worst_max_owned: int  # over SMALL_CASE_NAME_SETS random name sets
    mean_max_over_mean: float


@dataclass(frozen=True, slots=True)
class ModeResult:
    spread: Spread
    join: Churn
    leave: Churn
    after_walk: Spread  # after WALK_STEPS random joins and leaves, each from the last result
    small_cases: tuple[SmallCase, ...]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ring_sim", description=__doc__)
    parser.add_argument("--queues", type=int, default=10_000)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--joins", type=int, default=100, help="random joins to average over")
    parser.add_argument("--leaves", type=int, default=100, help="random leaves to average over")
    parser.add_argument("--virtual-nodes", type=int, default=150)
    parser.add_argument("--load-factor", type=float, default=1.10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--budget-s", type=float, default=150.0, help="cut join/leave samples to fit this"
    )
    parser.add_argument("--quick", action="store_true", help="1,000 queues, 50 instances")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.queues, args.instances, args.joins, args.leaves = 1_000, 50, 10, 10
    return args


def spread_of(assignment: Mapping[str, str], members: Sequence[str]) -> Spread:
    owned = Counter(assignment.values())
    counts = [owned[member] for member in members]  # members owning nothing count as 0
    mean = len(assignment) / len(members)
    return Spread(
        max_over_mean=max(counts) / mean,
        min_over_mean=min(counts) / mean,
        max_owned=max(counts),
    )


def count_moved(before: Mapping[str, str], after: Mapping[str, str]) -> int:
    return sum(1 for queue, owner in after.items() if before[queue] != owner)


def measure_joins(
    assigner: Assigner, queues: Sequence[str], members: Sequence[str], joiners: Sequence[str]
) -> Churn:
    before = assigner(queues, members, {})
    moved, newcomer_owned = [], []
    for joiner in joiners:
        after = assigner(queues, [*members, joiner], before)
        moved.append(count_moved(before, after))
        newcomer_owned.append(sum(1 for owner in after.values() if owner == joiner))
    mean_owned = len(queues) / (len(members) + 1)
    return Churn(
        samples=len(joiners),
        moved_mean=sum(moved) / len(moved),
        ideal_moved=mean_owned,
        newcomer_share=sum(newcomer_owned) / len(newcomer_owned) / mean_owned,
    )


def measure_leaves(
    assigner: Assigner, queues: Sequence[str], members: Sequence[str], leavers: Sequence[str]
) -> Churn:
    before = assigner(queues, members, {})
    moved = [
        count_moved(before, assigner(queues, [m for m in members if m != leaver], before))
        for leaver in leavers
    ]
    return Churn(
        samples=len(leavers),
        moved_mean=sum(moved) / len(moved),
        ideal_moved=len(queues) / len(members),
        newcomer_share=None,
    )


def measure_small_case(
    assigner: Assigner, queue_count: int, member_count: int, rng: random.Random
) -> SmallCase:
    members = [f"instance-{chr(ord('a') + index)}" for index in range(member_count)]
    queues = [f"queue-{index:02d}" for index in range(queue_count)]
    spreads = []
    for _ in range(SMALL_CASE_NAME_SETS):
        random_queues = [f"q-{rng.getrandbits(48):012x}" for _ in range(queue_count)]
        random_members = [f"i-{rng.getrandbits(48):012x}" for _ in range(member_count)]
        spreads.append(spread_of(assigner(random_queues, random_members, {}), random_members))
    return SmallCase(
        queue_count=queue_count,
        member_count=member_count,
        fixed_names=spread_of(assigner(queues, members, {}), members),
        worst_max_owned=max(spread.max_owned for spread in spreads),
        mean_max_over_mean=sum(spread.max_over_mean for spread in spreads) / len(spreads),
    )


def make_assigner(args: argparse.Namespace, mode: str) -> Assigner:
    def assigner(
        queues: Sequence[str], members: Sequence[str], current: Mapping[str, str]
    ) -> dict[str, str]:
        if mode == "rebalance":
            return rebalance(
                queues,
                members,
                current,
                virtual_nodes=args.virtual_nodes,
                load_factor=args.load_factor,
            )
        return assign(
            queues,
            members,
            virtual_nodes=args.virtual_nodes,
            load_factor=args.load_factor,
            bounded=mode == "stateless",
        )

    return assigner


def walk_spread(
    assigner: Assigner, queues: Sequence[str], members: Sequence[str], seed: int
) -> Spread:
    """Random joins and leaves (half each), every step starting from the last result."""
    rng = random.Random(seed)
    live = list(members)
    owners = assigner(queues, live, {})
    for step in range(WALK_STEPS):
        if rng.random() < 0.5 and len(live) > 2:
            live.remove(rng.choice(live))
        else:
            live.append(f"instance-walk-{step}-{rng.getrandbits(32):08x}")
        owners = assigner(queues, live, owners)
    return spread_of(owners, live)


def run_mode(
    assigner: Assigner,
    queues: Sequence[str],
    members: Sequence[str],
    churners: tuple[Sequence[str], Sequence[str]],
    seed: int,
) -> ModeResult:
    joiners, leavers = churners
    small_rng = random.Random(seed)  # same small-case names for every mode
    return ModeResult(
        spread=spread_of(assigner(queues, members, {}), members),
        join=measure_joins(assigner, queues, members, joiners),
        leave=measure_leaves(assigner, queues, members, leavers),
        after_walk=walk_spread(assigner, queues, members, seed),
        small_cases=tuple(
            measure_small_case(assigner, queue_count, member_count, small_rng)
            for queue_count, member_count in SMALL_CASES
        ),
    )


def fit_samples(args: argparse.Namespace, queues: Sequence[str], members: Sequence[str]) -> str:
    """Shrink --joins/--leaves if one pass of every mode per sample overruns the budget."""
    started = time.perf_counter()
    for mode in MODES:
        make_assigner(args, mode)(queues, [*members, "instance-timing-probe"], {})
    seconds_per_sample = time.perf_counter() - started
    estimate_s = seconds_per_sample * (args.joins + args.leaves)
    if estimate_s <= args.budget_s:
        return ""
    scale = args.budget_s / estimate_s
    requested = (args.joins, args.leaves)
    args.joins = max(MIN_CHURN_SAMPLES, int(args.joins * scale))
    args.leaves = max(MIN_CHURN_SAMPLES, int(args.leaves * scale))
    return (
        f"Note: {seconds_per_sample:.2f} s per sample; cut joins/leaves from {requested} to "
        f"({args.joins}, {args.leaves}) to fit --budget-s {args.budget_s:g}."
    )


def verdict(is_met: bool) -> str:
    return "met" if is_met else "MISSED"


def churn_cell(churn: Churn) -> str:
    return f"{churn.moved_mean:.1f} ({churn.moved_over_ideal:.2f}x ideal)"


def row(label: str, cells: Sequence[str], target: str = "") -> str:
    return f"| {label} | {' | '.join(cells)} | {target} |"


def large_rows(results: Mapping[str, ModeResult]) -> list[str]:
    daemon = results["rebalance"]
    modes = [results[mode] for mode in MODES]
    ideal_join, ideal_leave = daemon.join.ideal_moved, daemon.leave.ideal_moved
    share = daemon.join.newcomer_share or 0.0
    return [
        row(
            "max / mean owned",
            [f"{r.spread.max_over_mean:.2f}" for r in modes],
            f"≤ 1.10: {verdict(daemon.spread.max_over_mean <= 1.10 + 1e-9)}",
        ),
        row("min / mean owned", [f"{r.spread.min_over_mean:.2f}" for r in modes]),
        row(
            f"queues moved per join (avg of {daemon.join.samples}; ideal {ideal_join:.1f})",
            [churn_cell(r.join) for r in modes],
            f"≤ 1.20x ideal: {verdict(daemon.join.moved_over_ideal <= 1.20)}",
        ),
        row(
            "newcomer's queues / mean owned",
            [f"{r.join.newcomer_share or 0.0:.2f}" for r in modes],
            f"≥ 0.90: {verdict(share >= 0.90)}",
        ),
        row(
            f"queues moved per leave (avg of {daemon.leave.samples}; ideal {ideal_leave:.1f})",
            [churn_cell(r.leave) for r in modes],
        ),
        row(
            f"max / mean after {WALK_STEPS} random joins and leaves",
            [f"{r.after_walk.max_over_mean:.2f}" for r in modes],
            "≤ ⌈c·Q/N⌉ / mean",
        ),
    ]


def small_rows(results: Mapping[str, ModeResult]) -> list[str]:
    rows = []
    for index, (queue_count, member_count) in enumerate(SMALL_CASES):
        cases = [results[mode].small_cases[index] for mode in MODES]
        daemon = results["rebalance"].small_cases[index]
        label = f"{queue_count} queues / {member_count}"
        bound = math.ceil(queue_count / member_count) + 1
        rows += [
            row(
                f"{label}: max / mean (queue-NN over instance-a..)",
                [f"{c.fixed_names.max_over_mean:.2f}" for c in cases],
            ),
            row(
                f"{label}: mean max / mean ({SMALL_CASE_NAME_SETS} random name sets)",
                [f"{c.mean_max_over_mean:.2f}" for c in cases],
            ),
            row(
                f"{label}: worst max owned ({SMALL_CASE_NAME_SETS} random name sets)",
                [str(c.worst_max_owned) for c in cases],
                f"≤ {bound}: {verdict(daemon.worst_max_owned <= bound)}",
            ),
        ]
    return rows


def capacity_line(args: argparse.Namespace) -> str:
    def cap(member_count: int) -> int:
        return capacity(
            queue_count=args.queues, member_count=member_count, load_factor=args.load_factor
        )

    n = args.instances
    return (
        f"Capacity per instance: {cap(n)} at N={n}, {cap(n + 1)} after a join, "
        f"{cap(n - 1)} after a leave (a capacity change lets every full instance take one more)."
    )


def render_markdown(args: argparse.Namespace, results: Mapping[str, ModeResult]) -> str:
    header = [
        f"{args.queues} queues over {args.instances} instances, {args.virtual_nodes} virtual "
        f"nodes, load factor {args.load_factor:g}",
        "",
        "| metric | plain uhashring | stateless bounded loads | rebalance (the daemon) "
        "| target (the daemon) |",
        "|---|---|---|---|---|",
    ]
    return "\n".join([*header, *large_rows(results), *small_rows(results)])


def write_json(path: Path, args: argparse.Namespace, results: dict[str, ModeResult]) -> None:
    parameters = {key: value for key, value in vars(args).items() if key != "json"}
    document = {
        "parameters": parameters,
        **{mode: asdict(result) for mode, result in results.items()},
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    queues = [f"queue-{index:05d}" for index in range(args.queues)]
    members = [f"instance-{index:03d}" for index in range(args.instances)]
    note = fit_samples(args, queues, members)
    rng = random.Random(args.seed)
    joiners = [f"instance-joiner-{rng.getrandbits(48):012x}" for _ in range(args.joins)]
    leavers = rng.sample(members, min(args.leaves, len(members)))
    results = {
        mode: run_mode(make_assigner(args, mode), queues, members, (joiners, leavers), args.seed)
        for mode in MODES
    }
    print(render_markdown(args, results))
    print()
    print(capacity_line(args))
    if note:
        print(note)
    if args.json:
        write_json(args.json, args, results)
    print(f"Run time: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
