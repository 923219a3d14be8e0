"""Load-aware planning against count-based planning in the load model of tests/sim.

Zipf(1) demand over 1,000 queues and 20 instances of 16 workers at 60% mean utilisation,
±20% over the hour, six hot-tenant shifts, a join at 24 min and a leave at 42 min, a plan
every 30 s from the encoded member summaries (after 30 min of warm-up). No AWS.

    python -m bench.loadplan_sim              # seed 13, Markdown on stdout
    python -m bench.loadplan_sim --seeds 10   # worst and mean over ten seeds as well

Utilisation here is demand over workers (it may pass 1: that instance falls behind), and
max/mean is the most loaded instance over the fleet's mean, each round.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests" / "sim")]

from loadworld import (  # noqa: E402
    Planner,
    RunFigures,
    WorldSettings,
    count_based,
    load_aware,
    run,
)

PLANNERS: dict[str, Planner] = {"load-aware": load_aware, "count-based": count_based}
TIMELINE_EVERY_S = 300.0


@dataclass(frozen=True, slots=True)
class Row:
    planner: str
    figures: RunFigures
    cpu_per_round_ms: float


def measure(seed: int) -> list[Row]:
    settings = WorldSettings(seed=seed)
    rows = []
    for name, planner in PLANNERS.items():
        started = time.process_time()
        figures = run(settings, planner)
        rounds = (settings.warmup_s + settings.duration_s) / settings.round_s
        rows.append(Row(name, figures, (time.process_time() - started) * 1000 / rounds))
    return rows


def summary_table(rows: list[Row], duration_s: float) -> str:
    lines = [
        "| planner | worst max/mean | worst settled | mean max/mean | rounds ≤ 1.2 "
        "| moves/h | flaps | most moves of a queue | most owners | CPU/round (model + plan) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        f = row.figures
        lines.append(
            f"| {row.planner} | {f.worst_max_over_mean:.2f} | {f.worst_settled_max_over_mean:.2f}"
            f" | {f.mean_max_over_mean:.3f} | {f.share_within(1.2):.0%}"
            f" | {f.moves_per_hour(duration_s):.0f} | {f.flaps()} | {f.most_moves_of_one_queue()}"
            f" | {max(r.most_owners for r in f.rounds)} | {row.cpu_per_round_ms:.0f} ms |"
        )
    return "\n".join(lines)


def timeline(rows: list[Row]) -> str:
    """Per 5 minutes: the worst max/mean, and the worst outside the rounds reacting to a change."""
    header = "| minute | " + " | ".join(f"{r.planner} worst / settled" for r in rows) + " |"
    lines = [header, "|---|" + "---|" * len(rows)]
    per_window = int(TIMELINE_EVERY_S / 30)
    first = rows[0].figures.rounds
    for start in range(0, len(first), per_window):
        cells = []
        for row in rows:
            window = row.figures.rounds[start : start + per_window]
            settled = [r.max_over_mean for r in window if not r.is_reacting]
            cells.append(
                f"{max(r.max_over_mean for r in window):.2f} / "
                + (f"{max(settled):.2f}" if settled else "-")
            )
        lines.append(f"| {first[start].time_s / 60:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def over_seeds(
    seeds: range, picks: dict[str, Callable[[RunFigures], float]]
) -> dict[tuple[str, str], tuple[float, float]]:
    """(planner, figure) -> (worst, mean) over the seeds, one run per seed and planner."""
    values: dict[tuple[str, str], list[float]] = {}
    for seed in seeds:
        for row in measure(seed):
            for figure, pick in picks.items():
                values.setdefault((row.planner, figure), []).append(pick(row.figures))
    return {key: (max(v), sum(v) / len(v)) for key, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--seeds", type=int, default=0, help="also summarise this many seeds")
    args = parser.parse_args()
    settings = WorldSettings(seed=args.seed)
    rows = measure(args.seed)
    print(f"## Load-aware vs count-based planning, seed {args.seed}\n")
    print(summary_table(rows, settings.duration_s))
    print("\n'settled': rounds more than two rounds (60 s) after a load shift or membership")
    print("change. A flap is a move that undoes the queue's previous move.\n")
    print("### max/mean utilisation over the hour\n")
    print(timeline(rows))
    if args.seeds:
        seeds = range(args.seed, args.seed + args.seeds)
        print(f"\n### Over seeds {seeds.start}..{seeds.stop - 1}: worst / mean\n")
        print("| planner | worst settled max/mean | moves/h |")
        print("|---|---|---|")
        found = over_seeds(
            seeds,
            {
                "settled": lambda f: f.worst_settled_max_over_mean,
                "moves": lambda f: f.moves_per_hour(settings.duration_s),
            },
        )
        for name in PLANNERS:
            settled, moves = found[name, "settled"], found[name, "moves"]
            print(
                f"| {name} | {settled[0]:.2f} / {settled[1]:.2f}"
                f" | {moves[0]:.0f} / {moves[1]:.0f} |"
            )


if __name__ == "__main__":
    main()
