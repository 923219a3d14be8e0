"""Start-up and `status` at 1,000 and 10,000 queues: this checkout against a baseline.

    python -m bench.startup_scale --baseline /tmp/base --queues 1000,10000 [--scale-emulator]

`--baseline` is a checkout of the code to compare with (e.g. `git archive main | tar -x`);
both variants run in the same emulator, on the same queues, one after the other, each with
its own table; without it, this checkout alone. `--scale-emulator` hosts moto for thousands
of long polls (bench/emulator.py `--scale`: quiet empty long polls, partition-only table
queries, items serialised as stored, routing computed once, 16 KB DynamoDB pages):
without it, the start-up figures past joining measure moto, not the daemon.
`--split-services` puts the table on an emulator process of its own (botocore's
AWS_ENDPOINT_URL_DYNAMODB), as AWS serves SQS and DynamoDB apart: on one moto process the
conditional writes of a start-up queue behind every consumed queue's receives. Per variant
and size, on a fresh fixed-timings cluster (heartbeat 5 s,
timeout 20 s, rebalance delay 1 s, long polls of 20 s):

- discovery alone (bench.discovery_probe, no daemon running): a cold and a warm refresh;
- instance A starts alone: seconds from its process start to "joined the cluster", to
  its first "handoff complete" (holding the rows of every queue: its share when alone) and
  to its last "consuming queue" once it consumes them all (a poller started per owned row,
  waiting at most 120 s more), and how often it self-fenced by then, from its log, so that
  watching costs the emulator nothing;
- instance B starts next to it: the same two (its first handoff complete: its share taken),
  waiting at most 90 s for the handoff (the coordinator's part, which stalls on a loaded
  emulator), then how many rows each owns and whether every queue is owned once (only up to
  1,000 queues);
- SQS calls each instance made by then, counted server-side by access key; one
  `status --json` (and `--details` where the variant has it): seconds and SQS calls.
  `status` waits heartbeat_interval x 1.25 = 6.25 s by design (two reads for liveness).

Prints JSON and writes it to `--out` (default bench/results/startup-<time>.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.harness import Harness, stop_processes, wait_until
from bench.measure import REPO, EmulatorProcess, child_env, requests_of

logger = logging.getLogger("bench")
# Slack for an emulator that stalls under thousands of long polls on a shared machine: with
# a 4 s timeout instances judged each other dead during the handoff, and the table client's
# read timeout (heartbeat_interval / 4) must outlast the emulator's stalls.
STATUS_WAIT_S = 5 * 1.25
# Above this many queues B is left out: the handoff of thousands of long-polled queues on a
# 2-core emulator takes minutes of the run and measures moto, not the daemon.
SECOND_INSTANCE_MAX = 1000
_TIMINGS = {"HEARTBEAT_INTERVAL": "5", "HEARTBEAT_TIMEOUT": "20", "REBALANCE_DELAY": "1"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup_scale", description=__doc__)
    parser.add_argument("--baseline", type=Path, default=None, help="checkout to compare with")
    parser.add_argument("--scale-emulator", action="store_true", help="see bench.emulator")
    parser.add_argument("--no-details", action="store_true", help="skip status --details")
    parser.add_argument(
        "--split-services", action="store_true", help="DynamoDB on an emulator of its own"
    )
    parser.add_argument(
        "--keepalive-threads",
        type=int,
        default=0,
        help="serve SQS from waitress with this many threads (one per open long poll)",
    )
    parser.add_argument("--queues", default="1000,10000", help="sizes, comma-separated")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per phase")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "bench" / "results" / f"startup-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    variants = {"baseline": args.baseline.resolve()} if args.baseline else {}
    variants["this"] = REPO
    results: dict[str, Any] = {
        "variants": {k: str(v) for k, v in variants.items()},
        "scale_emulator": args.scale_emulator,
        "split_services": args.split_services,
        "runs": [],
    }
    options = {
        "scale": args.scale_emulator,
        "details": not args.no_details,
        "split": args.split_services,
        "keepalive_threads": args.keepalive_threads,
    }
    for size in (int(n) for n in args.queues.split(",")):
        results["runs"].extend(_size(size, variants, out.parent, args.timeout_s, **options))
        out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


def _size(
    size: int,
    variants: dict[str, Path],
    log_dir: Path,
    timeout_s: float,
    *,
    scale: bool,
    details: bool,
    split: bool,
    keepalive_threads: int,
) -> list[Any]:
    log = log_dir / f"startup-emulator-{size}.log"
    with contextlib.ExitStack() as hosts:
        emulator = hosts.enter_context(
            EmulatorProcess(
                patch=True,
                log_path=log,
                scale=scale,
                http="keepalive" if keepalive_threads else None,
                threads=keepalive_threads or None,
            )
        )
        table_emulator = emulator
        if split:
            table_log = log_dir / f"startup-emulator-{size}-dynamodb.log"
            table_emulator = hosts.enter_context(
                EmulatorProcess(patch=True, log_path=table_log, scale=scale)
            )
        harness = Harness(emulator.endpoint)
        tables = Harness(table_emulator.endpoint)
        started = time.monotonic()
        harness.create_queues([f"st{size}-q{i:05d}" for i in range(size)])
        logger.info("%d queues created in %.1f s", size, time.monotonic() - started)
        runs = []
        for name, root in variants.items():
            run = Run(emulator, harness, size=size, variant=name, root=root, log_dir=log_dir)
            run.use_tables(table_emulator, tables)
            measured = {"discovery": run.probe(), **run.measure(timeout_s, details=details)}
            runs.append(measured)
            logger.info("%s", json.dumps(runs[-1]))
        return runs


class Run:
    def __init__(
        self,
        emulator: EmulatorProcess,
        harness: Harness,
        *,
        size: int,
        variant: str,
        root: Path,
        log_dir: Path,
    ) -> None:
        self.emulator, self.harness = emulator, harness
        self.size, self.variant, self.root, self.log_dir = size, variant, root, log_dir
        self.app = f"st{size}-{variant}"
        self.share_wait_s = 90.0
        self.has_second = size <= SECOND_INSTANCE_MAX
        self.table = f"bench-{self.app}"
        self.tables, self.tables_endpoint = harness, emulator.endpoint

    def use_tables(self, emulator: EmulatorProcess, harness: Harness) -> None:
        """Where the table lives (the SQS emulator unless --split-services); created there."""
        self.tables, self.tables_endpoint = harness, emulator.endpoint
        harness.create_table(self.table)

    def env(self, key: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        settings = {
            "SQSBALANCERD_APPLICATION_NAME": self.app,
            "SQSBALANCERD_COORDINATION__TABLE_NAME": self.table,
            "SQSBALANCERD_DISCOVERY__QUEUE_PATTERN": f"^st{self.size}-q",
            **{f"SQSBALANCERD_COORDINATION__{k}": v for k, v in _TIMINGS.items()},
        }
        if self.tables_endpoint != self.emulator.endpoint:
            settings["AWS_ENDPOINT_URL_DYNAMODB"] = self.tables_endpoint
        return child_env(key, self.emulator.endpoint, {**settings, **(extra or {})})

    def start(self, instance: str) -> subprocess.Popen[bytes]:
        env = self.env(
            self.key(instance),
            {
                "PYTHONPATH": str(self.root),
                "SQSBALANCERD_HANDLER": "bench.handlers:handle",
                "SQSBALANCERD_INSTANCE_ID": instance,
                "SQSBALANCERD_SQS__WAIT_TIME_SECONDS": "20",
                "SQSBALANCERD_SHUTDOWN__TIMEOUT": "5",
                "SQSBALANCERD_OBSERVABILITY__HTTP_PORT": "0",
                "SQSBALANCERD_OBSERVABILITY__LOG_FORMAT": "json",
                "BENCH_IDS_FILE": str(self.log_dir / f"{self.app}.ids"),
                "BENCH_HANDLER_MS": "0",
            },
        )
        log = open(self.log_dir / f"{self.app}-{instance}.log", "wb")  # noqa: SIM115
        command = [sys.executable, "-m", "sqsbalancerd", "run"]
        return subprocess.Popen(command, cwd=self.root, env=env, stdout=log, stderr=log)

    def key(self, instance: str) -> str:
        return f"{self.app}-{instance}"

    def measure(self, timeout_s: float, *, details: bool) -> dict[str, Any]:
        result: dict[str, Any] = {"queues": self.size, "variant": self.variant}
        processes: list[subprocess.Popen[bytes]] = []
        try:
            instances = [("a", timeout_s), ("b", self.share_wait_s)][: 2 if self.has_second else 1]
            for instance, wait_s in instances:
                started_wall = time.time()
                processes.append(self.start(instance))
                result[instance] = self.follow(instance, started_wall, wait_s)
                result[instance].update(self.consuming(instance, started_wall))
                owners = self.tables.owners(self.table, self.app)
                result[instance]["owned"] = list(owners.values()).count(instance)
                result[instance]["sqs_calls"] = self.sqs_calls(instance)
            result["owned_once"] = len(owners) == self.size and all(owners.values())
            result["status"] = self.status([])
            if details:
                result["status_details"] = self.status(["--details"])
        finally:
            stop_processes(processes, timeout_s=60, second_signal_after_s=10)
        return result

    def follow(self, instance: str, started_wall: float, timeout_s: float) -> dict[str, Any]:
        log = self.log_dir / f"{self.app}-{instance}.log"
        events: dict[str, float] = {}

        def seen() -> bool:
            for line in log.read_text(errors="replace").splitlines():
                if '"joined the cluster"' in line or '"handoff complete"' in line:
                    event = json.loads(line)
                    events.setdefault(event["msg"], _epoch(event["ts"]))
            return "handoff complete" in events

        wait_until(seen, timeout_s=timeout_s, every_s=0.5)
        return {
            name: round(events[msg] - started_wall, 2) if msg in events else None
            for name, msg in (
                ("joined_s", "joined the cluster"),
                ("owns_share_s", "handoff complete"),
            )
        }

    def consuming(self, instance: str, started_wall: float) -> dict[str, Any]:
        """Seconds from process start to the last "consuming queue" once there are as many
        distinct ones as its last "handoff complete" says it holds ("mine": read from the
        log, not the table, whose row format differs between variants), and self-fences."""
        log = self.log_dir / f"{self.app}-{instance}.log"
        found: dict[str, Any] = {}
        consumed_at = _consumed_at(found)

        def consumed() -> bool:
            found.clear()
            found.update(scan_log(log))
            return consumed_at() is not None

        wait_until(consumed, timeout_s=120, every_s=2.0)
        at = consumed_at()
        return {
            "consumes_all_s": None if at is None else round(at - started_wall, 2),
            "consuming": len(found.get("consuming", {})),
            "self_fenced": found.get("self_fenced", 0),
        }

    def probe(self) -> dict[str, Any]:
        """Discovery alone, in a process of its own with no daemon running: a cold and a warm
        refresh (bench.discovery_probe), the variant's own Discovery with its defaults."""
        env = self.env(self.key("probe"), {"PYTHONPATH": str(self.root)})
        command = [sys.executable, "-m", "bench.discovery_probe", "--pattern", f"^st{self.size}-q"]
        answer = subprocess.run(
            command, cwd=self.root, env=env, capture_output=True, timeout=900, check=True
        )
        return dict(json.loads(answer.stdout))

    def sqs_calls(self, instance: str) -> dict[str, int]:
        requests = requests_of(self.emulator.counts(), [self.key(instance)])
        return {k.removeprefix("sqs:"): v for k, v in sorted(requests.items()) if "sqs:" in k}

    def status(self, flags: list[str]) -> dict[str, Any]:
        key = self.key("status" + "".join(flags).replace("-", ""))
        env = self.env(key, {"PYTHONPATH": str(self.root)})
        command = [sys.executable, "-m", "sqsbalancerd", "status", "--json", *flags]
        started = time.monotonic()
        answer = subprocess.run(
            command, cwd=self.root, env=env, capture_output=True, timeout=600, check=False
        )
        seconds = time.monotonic() - started
        if not answer.stdout.strip():  # an error (or, for the baseline, no --details)
            stderr = answer.stderr.decode(errors="replace").strip().splitlines()
            error = next((line for line in stderr if "error" in line), stderr[-1:] or [""])
            return {"seconds": round(seconds, 2), "exit": answer.returncode, "error": error}
        report = json.loads(answer.stdout)
        return {
            "seconds": round(seconds, 2),
            "beyond_liveness_wait_s": round(seconds - STATUS_WAIT_S, 2),
            "exit": answer.returncode,
            "queues": len(report["queues"]),
            "sqs_calls": self.sqs_calls("status" + "".join(flags).replace("-", "")),
        }


def scan_log(log: Path) -> dict[str, Any]:
    """From a daemon's JSON log: when each queue was first consumed, how many queues its
    last "handoff complete" held ("mine"), and how often it self-fenced."""
    consuming: dict[str, float] = {}
    mine: int | None = None
    fenced = 0
    for line in log.read_text(errors="replace").splitlines():
        if '"consuming queue"' in line:
            event = json.loads(line)
            consuming.setdefault(event["queue"], _epoch(event["ts"]))
        elif '"handoff complete"' in line:
            mine = int(json.loads(line)["mine"])
        elif "(self-fenced)" in line:
            fenced += 1
    return {"consuming": consuming, "mine": mine, "self_fenced": fenced}


def _consumed_at(found: dict[str, Any]) -> Callable[[], float | None]:
    def at() -> float | None:
        consuming, mine = found.get("consuming", {}), found.get("mine")
        if not mine or len(consuming) < mine:
            return None
        return float(sorted(consuming.values())[mine - 1])

    return at


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


if __name__ == "__main__":
    raise SystemExit(main())
