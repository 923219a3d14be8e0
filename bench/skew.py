"""Skewed workloads (issue 12): one hot tenant among many idle queues, before vs after.

    python -m bench.skew --quick          # about two minutes, small sizes
    python -m bench.skew                  # the full run (about 15 minutes on 2 cores)
    python -m bench.skew --write-docs     # also docs/bench-skew.md and its plot
    python -m bench.skew --report bench/results/skew-<time>/results.json --write-docs

Contenders in one run, on one counting moto server (bench/emulator.py): `after` is
sqsbalancerd from this checkout, `before` the same command from a checkout of 5b8bf56 (the
engine before issue 12; `--before-root`, with its own `.venv`), `batched` and `pylib` the
Python peers and `ceiling` the emulator ceiling (receive 10 + batch delete, no handler
sleep). Results go to bench/results/skew-<time>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import skew_report, skew_runs
from bench.consumers.registry import BY_KEY, ConsumerSpec, is_available
from bench.harness import Harness
from bench.measure import REPO
from bench.runs import Setting
from bench.skew_plan import SkewPlan, full_plan, quick_plan
from bench.skew_runs import Contender, SkewEmulator, SkewLoad, run_idle, run_skew

logger = logging.getLogger("bench.skew")


def contenders(before_root: Path) -> dict[str, Contender]:
    after = ConsumerSpec("after", "sqsbalancerd, this branch", "sqsbalancerd")
    before = ConsumerSpec("before", "sqsbalancerd at 5b8bf56 (before)", "sqsbalancerd")
    found = {
        "after": Contender(after, REPO, sys.executable),
        "before": Contender(before, before_root, str(before_root / ".venv" / "bin" / "python")),
        "batched": Contender(BY_KEY["batched"], REPO, sys.executable),
        "ceiling": Contender(BY_KEY["ceiling"], REPO, sys.executable, fixed_handler_ms=0.0),
    }
    if is_available(BY_KEY["pylib"]) is None:
        found["pylib"] = Contender(BY_KEY["pylib"], REPO, sys.executable)
    else:
        logger.warning("pylib skipped: aws-sqs-consumer is not installed")
    return found


def _each(
    setting: Setting,
    pool: dict[str, Contender],
    keys: Sequence[str],
    load: SkewLoad,
    repeats: int = 1,
) -> dict[str, Any]:
    """Rounds of every contender in turn; per contender the run with the most msgs/s.

    Other work shares this machine: interleaved rounds and the best of them keep one
    contender's unlucky minute from passing for the engine's speed. Every run's msgs/s and
    CPU stay in the results.
    """
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(repeats):
        for key in keys:
            if key not in pool:
                continue
            result = run_skew(setting, pool[key], load)
            brief = {k: result.get(k) for k in BRIEF}
            brief["calls/msg"] = result["requests_per_msg"].get("sqs:total")
            logger.info("  %s %s: %s", load.name, key, brief)
            runs.setdefault(key, []).append(result)
    results: dict[str, Any] = {}
    for key, done in runs.items():
        top = max(done, key=_rate)
        best = dict(top)
        best["runs_msgs_per_s"] = [r.get("msgs_per_s") for r in done]
        best["runs_cpu_s_per_1k"] = [r.get("cpu_s_per_1k") for r in done]
        results[key] = best
    return results


def _rate(result: dict[str, Any]) -> float:
    return float(result.get("msgs_per_s") or 0)


BRIEF = ("handled", "drain_s", "msgs_per_s", "cpu_s_per_1k", "peak_held", "lost")


def neighbours(setting: Setting, pool: dict[str, Contender], plan: SkewPlan) -> dict[str, Any]:
    """Scenarios 1 and 5: the hot queue alone and with 50, 200, 500 idle neighbours."""
    results: dict[str, Any] = {}
    for count in plan.neighbours:
        load = SkewLoad(f"hot{count}", [plan.hot_messages] + [0] * count, 20.0, pool_size=50)
        keys = list(plan.neighbour_contenders)
        if count in (0, 200):
            keys += [k for k in plan.peers if k not in keys]
        logger.info("hot queue, %d messages, %d idle neighbours", plan.hot_messages, count)
        results[str(count)] = _each(setting, pool, keys, load, plan.repeats)
    return results


def zipf(setting: Setting, pool: dict[str, Contender], plan: SkewPlan) -> dict[str, Any]:
    """Scenario 2: queue k of 100 gets a share proportional to 1/k."""
    weights = [1 / (k + 1) for k in range(plan.zipf_queues)]
    fill = [max(1, round(plan.zipf_messages * w / sum(weights))) for w in weights]
    load = SkewLoad("zipf", fill, 20.0, pool_size=50)
    logger.info("zipf: %d messages over %d queues (top %s)", load.total, len(fill), fill[:4])
    return {"fill_top": fill[:5], **_each(setting, pool, plan.zipf_contenders, load)}


def fanout(setting: Setting, pool: dict[str, Contender], plan: SkewPlan) -> dict[str, Any]:
    """Scenario 3: 10 messages to each of 1,000 idle queues, default pool (10) and bounds."""
    load = SkewLoad("fanout", [plan.fanout_each] * plan.fanout_queues, 10.0, pool_size=10)
    logger.info("fan-out: %d x %d", plan.fanout_queues, plan.fanout_each)
    setting = dataclasses.replace(setting, cap_s=plan.fanout_cap_s)
    return {
        "bound_held": 100 + 10,  # workers.queue_size default + one receive
        **_each(setting, pool, plan.fanout_contenders, load),
    }


def idle_many(setting: Setting, pool: dict[str, Contender], plan: SkewPlan) -> dict[str, Any]:
    """Scenario 4: thousands of owned idle queues in one process."""
    results: dict[str, Any] = {}
    for key in plan.idle_contenders:
        if key not in pool:  # left out by --contenders
            continue
        logger.info("idle: %d queues, %s", plan.idle_queues, key)
        results[key] = run_idle(setting, pool[key], plan.idle_queues, plan.idle_window_s)
        logger.info("  %s", {k: v for k, v in results[key].items() if k != "window_requests"})
    return results


def cpu(setting: Setting, pool: dict[str, Contender], plan: SkewPlan) -> dict[str, Any]:
    """Scenario 6: CPU per 1,000 messages, 4 busy queues, pool 10, 0/10/50 ms handlers."""
    results: dict[str, Any] = {}
    for handler_ms, per_queue in plan.cpu_loads:
        load = SkewLoad(f"cpu{handler_ms:g}", [per_queue] * 4, handler_ms, pool_size=10)
        logger.info("cpu: 4 x %d, handler %g ms", per_queue, handler_ms)
        keys = [k for k in plan.cpu_contenders if k != "ceiling" or handler_ms == 0]
        results[f"{handler_ms:g}"] = _each(setting, pool, keys, load, plan.repeats)
    return results


def profile(setting: Setting, pool: dict[str, Contender], plan: SkewPlan) -> dict[str, Any]:
    """`after` on the hot queue with 200 idle neighbours under cProfile (every thread)."""
    out = setting.results_dir / "skew-profile.prof"
    load = SkewLoad("profile", [plan.hot_messages] + [0] * 200, 20.0, pool_size=50)
    result = run_skew(setting, pool["after"], load, profile_out=out)
    return {"run": result, "top": skew_report.top_entries(out)}


def profile_fanout(setting: Setting, pool: dict[str, Contender], plan: SkewPlan) -> dict[str, Any]:
    """`after` on the fan-out under cProfile: where the time goes while it falls behind."""
    out = setting.results_dir / "skew-profile-fanout.prof"
    load = SkewLoad("proffan", [plan.fanout_each] * plan.fanout_queues, 10.0, pool_size=10)
    result = run_skew(setting, pool["after"], load, profile_out=out)
    return {"run": result, "top": skew_report.top_entries(out)}


SECTIONS = {
    "neighbours": neighbours,
    "zipf": zipf,
    "fanout": fanout,
    "idle": idle_many,
    "cpu": cpu,
    "profile": profile,
    "profile-fanout": profile_fanout,
}


# Sections that never scrape sqsbalancerd's /metrics (they report no peak held).
UNSCRAPED_SECTIONS = frozenset({"cpu"})
# Sections whose peak held is a target (the bound): scraped every 0.25 s, the others every
# 1 s. At 50 ms a scrape of 1,000 owned queues (~165 ms of the daemon's CPU each) never
# ended before the next: py-spy found the daemon rendering /metrics in several threads at
# once, 141 CPU s per 1,000 messages, 1,283 of 10,000 handled in the cap.
CLOSELY_SCRAPED_SECTIONS = frozenset({"fanout", "profile-fanout"})
CLOSE_SCRAPE_EVERY_S = 0.25


def run(
    plan: SkewPlan, out: Path, before_root: Path, only: set[str] | None = None
) -> dict[str, Any]:
    pool = {k: c for k, c in contenders(before_root).items() if only is None or k in only}
    results: dict[str, Any] = {"plan": plan.__dict__, "sections": {}, "load": {}}
    for name in plan.sections:
        # Other work shares this machine: note how busy it was when each section started.
        results["load"][name] = [round(x, 2) for x in os.getloadavg()]
        log_path = out / f"emulator-{name}.log"
        with SkewEmulator(log_path=log_path, quiet=plan.quiet_emulator) as emulator:
            setting = Setting(emulator, Harness(emulator.endpoint), out, cap_s=plan.cap_s)
            # The CPU section compares CPU per message with peers nobody scrapes: 20 scrapes
            # a second of /metrics cost `after` ~0.3 CPU s per 1,000 messages at 50 ms.
            skew_runs.SCRAPE = plan.scrape and name not in UNSCRAPED_SECTIONS
            skew_runs.SCRAPE_EVERY_S = (
                CLOSE_SCRAPE_EVERY_S if name in CLOSELY_SCRAPED_SECTIONS else 1.0
            )
            results["sections"][name] = SECTIONS[name](setting, pool, plan)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.skew",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, about two minutes")
    parser.add_argument("--only", help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    parser.add_argument("--before-root", type=Path, default=Path("/work/wt-before"))
    parser.add_argument("--idle-queues", type=int, help="scenario 4: owned idle queues")
    parser.add_argument("--repeats", type=int, help="rounds per contender (neighbours, cpu)")
    parser.add_argument("--neighbours", help="comma-separated idle neighbour counts")
    parser.add_argument(
        "--no-scrape", action="store_true", help="do not scrape /metrics (no peak held)"
    )
    parser.add_argument(
        "--quiet-emulator",
        action="store_true",
        help="idle long polls sleep until a send (bench.emulator --scale), for every contender",
    )
    parser.add_argument("--contenders", help="comma-separated: run only these contenders")
    parser.add_argument("--hot-messages", type=int, help="neighbours: messages on the hot queue")
    parser.add_argument("--write-docs", action="store_true", help="docs/bench-skew.md + plot")
    parser.add_argument("--report", type=Path, help="re-render a results.json, run nothing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.report:
        results = json.loads(args.report.read_text())
        out = args.report.parent
    else:
        plan = quick_plan() if args.quick else full_plan()
        if args.only:
            plan.sections = tuple(s for s in args.only.split(",") if s)
        if args.idle_queues:
            plan.idle_queues = args.idle_queues
        if args.repeats:
            plan.repeats = args.repeats
        if args.neighbours:
            plan.neighbours = tuple(int(n) for n in args.neighbours.split(","))
        plan.scrape = not args.no_scrape
        plan.quiet_emulator = args.quiet_emulator
        if args.hot_messages:
            plan.hot_messages = args.hot_messages
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
        out = REPO / "bench" / "results" / f"skew-{stamp}"
        out.mkdir(parents=True, exist_ok=True)
        only = set(args.contenders.split(",")) if args.contenders else None
        results = run(plan, out, args.before_root, only)
    markdown = skew_report.render(results, plot_dir=out)
    (out / "results.md").write_text(markdown)
    print(markdown)
    if args.write_docs:
        skew_report.write_docs(results, REPO / "docs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
