"""sqsbalancerd's benchmark: every consumer on the same workloads, on a local moto server.

    python -m bench --smoke            # seconds: proves the harness works end to end (CI)
    python -m bench                    # the full run (about 20 minutes on 2 cores)
    python -m bench --only throughput,idle --per-queue 2000
    python -m bench --write-docs       # also write docs/benchmarks.md and docs/bench-*.png
    python -m bench --report bench/results/<time>/results.json --write-docs   # re-render

Results go to bench/results/<time>/ (results.json, results.md, logs, id files). See
bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.plan import ALL_SECTIONS, Plan, smoke_plan

logger = logging.getLogger("bench")
BENCH_DIR = Path(__file__).resolve().parent
REQUIREMENTS = ("psutil", "matplotlib", "aws-sqs-consumer")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds in total")
    parser.add_argument("--only", help=f"comma-separated sections of: {', '.join(ALL_SECTIONS)}")
    parser.add_argument("--consumers", help="comma-separated consumer keys for throughput")
    parser.add_argument("--queues", type=int, help="throughput: queues")
    parser.add_argument("--per-queue", type=int, help="throughput: messages per queue")
    parser.add_argument("--handler-ms", help="throughput: comma-separated handler times, ms")
    parser.add_argument(
        "--in-flight-per-queue",
        type=int,
        help="throughput: handlers at once per queue for every consumer with a pool "
        "(sqsbalancerd's workers.pool_size, batched's --workers); 0: their defaults",
    )
    parser.add_argument(
        "--emulator-http",
        help="comma-separated: keepalive (waitress, the default), close (moto's werkzeug, "
        "Connection: close); throughput runs once per entry",
    )
    parser.add_argument("--cap-s", type=float, help="longest a consumer may take to drain")
    parser.add_argument("--idle-window-s", type=float, help="idle: counting window")
    parser.add_argument("--scale-max", type=int, help="scale: most owned queues")
    parser.add_argument("--discovery-queues", type=int, help="discovery: queues to create")
    parser.add_argument(
        "--coordination-default",
        action="store_true",
        help="coordination: also with default timings (10/30/30 s, minutes)",
    )
    parser.add_argument(
        "--no-moto-patch", action="store_true", help="stock moto (see bench/moto_patch.py)"
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not pip/npm install missing bench requirements",
    )
    parser.add_argument("--out", type=Path, help="results directory")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="RESULTS_JSON",
        help="only render the tables (and with --write-docs the docs) again from a results.json",
    )
    parser.add_argument(
        "--write-docs", action="store_true", help="write docs/benchmarks.md and docs/bench-*.png"
    )
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = smoke_plan() if args.smoke else Plan()
    if args.only:
        plan.sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
        unknown = set(plan.sections) - set(ALL_SECTIONS)
        if unknown:
            raise SystemExit(f"unknown sections: {', '.join(sorted(unknown))}")
    if args.consumers:
        plan.consumers = tuple(c.strip() for c in args.consumers.split(","))
    names = ("queues", "per_queue", "cap_s", "idle_window_s", "discovery_queues")
    for name in (*names, "in_flight_per_queue"):
        value = getattr(args, name)
        if value is not None:
            setattr(plan, name, value)
    if args.handler_ms:
        plan.handler_ms = tuple(float(ms) for ms in args.handler_ms.split(","))
    if args.emulator_http:
        plan.emulator_http = tuple(h.strip() for h in args.emulator_http.split(","))
        unknown_http = set(plan.emulator_http) - {"keepalive", "close"}
        if unknown_http:
            raise SystemExit(f"unknown --emulator-http: {', '.join(sorted(unknown_http))}")
    if args.scale_max:
        smaller = tuple(s for s in plan.scale_steps if s < args.scale_max)
        plan.scale_steps = (*smaller, args.scale_max)
    plan.coordination_default_timings = args.coordination_default
    return plan


def ensure_requirements(*, smoke: bool, allow_install: bool) -> None:
    """Full runs want psutil, matplotlib, aws-sqs-consumer and the npm packages."""
    missing = [name for name in REQUIREMENTS if not _importable(name)]
    if missing and allow_install and not smoke:
        logger.info("installing bench requirements: %s", " ".join(missing))
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=False)
    elif missing:
        logger.info(
            "optional bench requirements missing (%s): pip install %s",
            ", ".join(missing),
            " ".join(REQUIREMENTS),
        )
    node_dir = BENCH_DIR / "node"
    has_modules = (node_dir / "node_modules").is_dir()
    if not smoke and allow_install and not has_modules and shutil.which("npm"):
        logger.info("npm install in bench/node")
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent"],
            cwd=node_dir,
            check=False,
            timeout=600,
        )


def _importable(distribution: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(distribution.replace("-", "_")) is not None


def sections() -> dict[str, Callable[..., dict[str, Any]]]:
    from bench import coordination, extras, idle_scale
    from bench import sections as compare

    return {
        "throughput": compare.throughput,
        "latency": compare.latency,
        "many_queues": compare.many_queues,
        "idle": idle_scale.idle,
        "scale": idle_scale.scale,
        "discovery": idle_scale.discovery,
        "coordination": coordination.coordination,
        "ring": extras.ring,
        "profile": extras.profile,
    }


def machine() -> dict[str, Any]:
    import moto

    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "moto": moto.__version__,
        "boto3": _version("boto3"),
        "node": _command_output(["node", "--version"]),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "git": _command_output(
            ["git", "-C", str(BENCH_DIR.parent), "rev-parse", "--short", "HEAD"]
        ),
        "git_dirty_package_files": _command_output(
            ["git", "-C", str(BENCH_DIR.parent), "status", "--short", "--", "sqsbalancerd"]
        ),
    }


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _command_output(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return None


def run(plan: Plan, *, patch: bool, out: Path) -> dict[str, Any]:
    from bench.measure import EmulatorProcess

    runners = sections()
    results: dict[str, Any] = {
        "machine": machine(),
        "moto_patch": patch,
        "plan": {k: v for k, v in vars(plan).items()},
    }
    timings: dict[str, float] = {}
    for name in plan.sections:
        started = time.monotonic()
        # A fresh emulator per section: no section pays for another's queues.
        try:
            for index, http in enumerate(plan.emulator_http):
                if index and name != "throughput":
                    break  # only throughput compares the emulator's HTTP modes
                log_path = out / "emulator.log"
                with EmulatorProcess(patch=patch, log_path=log_path, http=http) as emulator:
                    found = runners[name](emulator, plan, out)
                suffix = f"-{http}" if index else ""
                if index:
                    found = {f"{key}{suffix}": value for key, value in found.items()}
                results.setdefault(name, {}).update(found)
        except Exception as exc:  # one broken section must not cost the others' results
            logger.exception("section %s failed", name)
            results.setdefault("failed_sections", {})[name] = f"{type(exc).__name__}: {exc}"
        timings[name] = round(time.monotonic() - started, 1)
        results["section_seconds"] = timings
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        logger.info("section %s done in %.1f s", name, timings[name])
    return results


def check_smoke(results: dict[str, Any]) -> list[str]:
    """What must hold for the smoke run to pass: everything handled, nothing lost."""
    problems = []
    for name, drained in results.get("throughput", {}).items():
        for key, r in drained.items():
            if "skipped" in r:
                continue
            if not r["drained"] or r["lost"] or r["handled"] != r["sent"]:
                problems.append(
                    f"{name}/{key}: handled {r['handled']}/{r['sent']}, "
                    f"lost {r['lost']}, drained {r['drained']}"
                )
            if not r["requests"].get("sqs:ReceiveMessage"):
                problems.append(f"{name}/{key}: no ReceiveMessage counted by the server")
    for name in ("latency", "many_queues"):
        for key, r in results.get(name, {}).items():
            if "skipped" not in r and (r["lost"] or r["latency_ms_p50"] is None):
                problems.append(f"{name}/{key}: lost {r['lost']}, p50 {r['latency_ms_p50']}")
    coordination = results.get("coordination", {}).get("fast")
    if coordination and coordination["lost"]:
        problems.append(f"coordination: lost {coordination['lost']}")
    return problems


def write_outputs(results: dict[str, Any], out: Path, *, write_docs: bool) -> str:
    from bench import report

    text = report.markdown(results)
    results["targets"] = report.targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(text)
    report.plots(results, out)
    if write_docs:
        from bench.docs import write_docs as write

        write(results, text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name, value in (("AWS_EC2_METADATA_DISABLED", "true"), ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    if args.report:
        results = json.loads(args.report.read_text())
        print(write_outputs(results, args.report.parent, write_docs=args.write_docs))
        return 0
    plan = make_plan(args)
    ensure_requirements(smoke=args.smoke, allow_install=not args.no_install)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.out or BENCH_DIR / "results" / (("smoke-" if args.smoke else "") + stamp)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = run(plan, patch=not args.no_moto_patch, out=out)
    results["command"] = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    results["total_seconds"] = round(time.monotonic() - started, 1)
    text = write_outputs(results, out, write_docs=args.write_docs)
    print(text)
    logger.info("results in %s (%.0f s)", out, results["total_seconds"])
    problems = check_smoke(results) if args.smoke else []
    problems += [f"section {k}: {v}" for k, v in results.get("failed_sections", {}).items()]
    for problem in problems:
        logger.error("smoke check failed: %s", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
