"""Idle queues below the long-poll floor: requests per idle queue and worst pickup latency.

    python -m bench.idle_latency [--scale 10] [--window 120] [--queues 20] [--latency-queues 24]

One run, three budgets at once (`sqs.idle_latency` 0, 60 and 300 s), each in its own
`sqsbalancerd run` processes against the bench emulator, which counts every request by
access key. Time is scaled down by `--scale` so the run stays short (about 5 minutes): at
10, the 20 s long poll is 2 s and the budgets are 0, 6 and 30 s; figures are converted back
(requests per real hour, latencies in real seconds = measured times scale). Per budget:

- a *rate* process owning `--queues` queues that never get a message: its ReceiveMessage
  calls over the window, per queue, per hour (the floor is 3600 / 20 = 180);
- a *latency* process owning `--latency-queues` queues, each sent one message at a random
  moment of its idle cycle, again and again: the time from the send to the handler's start
  (worst, p95, p50 over every send). The bound is the budget plus the poll's round trip.

The scaled run keeps what the figures depend on (long poll : budget ratio, one poll per
cycle) but not the idle threshold (a minute at full scale, min(60 s, budget) here) nor the
round trip, which counts `--scale` times more in the converted latencies (an upper bound).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUDGETS_S = (0.0, 60.0, 300.0)  # full-scale idle_latency values
WAIT_S = 20  # full-scale long poll
PICKUPS_ENV = "SQSB_BENCH_PICKUPS"


def record_pickup(message: Any) -> None:
    """The latency processes' handler: when each message started, beside its send time."""
    line = json.dumps({"queue": message.queue_name, "sent": message.json()["t"], "t": time.time()})
    with open(os.environ[PICKUPS_ENV] + f".{os.getpid()}", "a") as out:
        out.write(line + "\n")


@dataclass
class Group:
    budget_s: float  # full scale
    kind: str  # "rate" or "latency"
    queues: list[str]
    key: str  # access key: the emulator counts each process apart
    proc: subprocess.Popen[bytes] | None = None
    sent: list[tuple[str, float]] = field(default_factory=list)  # (queue, send time)


def _config(prefix: str, *, wait_s: int, budget_s: float, handler: str) -> str:
    return f"""
handler = "{handler}"
coordination.mode = "standalone"
[discovery]
queue_pattern = "^{prefix}"
[sqs]
wait_time_seconds = {wait_s}
idle_latency = {budget_s}
[observability]
http_port = 0
log_format = "json"
"""


def _start(group: Group, endpoint: str, out: Path, *, scale: float) -> None:
    from bench.measure import REPO, child_env

    prefix = group.queues[0].rsplit("-", 1)[0] + "-"
    config = out / f"{group.key}.toml"
    config.write_text(
        _config(
            prefix,
            wait_s=max(1, round(WAIT_S / scale)),
            budget_s=group.budget_s / scale,
            handler="bench.idle_latency:record_pickup",
        )
    )
    env = child_env(group.key, endpoint, {PICKUPS_ENV: str(out / "pickups.jsonl")})
    log = open(out / f"{group.key}.log", "wb")  # noqa: SIM115 - kept for the child's life
    group.proc = subprocess.Popen(
        [sys.executable, "-m", "sqsbalancerd", "run", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _receives(counts: dict[str, Any], key: str) -> int:
    return int(counts.get("requests", {}).get(key, {}).get("sqs", {}).get("ReceiveMessage", 0))


def _send_loop(sqs: Any, urls: dict[str, str], group: Group, cycle_s: float, stop: Any) -> None:
    """Per queue: wait long enough for it to be idle again, then a random phase; send."""
    rng = random.Random(group.key)
    next_at = {q: time.monotonic() + rng.uniform(0, cycle_s) for q in group.queues}
    while not stop.is_set():
        queue, at = min(next_at.items(), key=lambda item: item[1])
        if stop.wait(max(0.0, at - time.monotonic())):
            return
        sent = time.time()
        sqs.send_message(QueueUrl=urls[queue], MessageBody=json.dumps({"t": sent}))
        group.sent.append((queue, sent))
        # Picked up within a cycle; idle again a threshold later; then a random phase.
        next_at[queue] = time.monotonic() + 3 * cycle_s + rng.uniform(0, cycle_s)


def _desynchronise(sqs: Any, urls: dict[str, str], groups: list[Group], spread_s: float) -> None:
    rng = random.Random(0)
    sends = sorted((rng.uniform(0, spread_s), q) for g in groups for q in g.queues)
    started = time.monotonic()
    for at, queue in sends:
        time.sleep(max(0.0, started + at - time.monotonic()))
        sqs.send_message(QueueUrl=urls[queue], MessageBody=json.dumps({"t": time.time()}))


def _pickups(out: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for file in out.glob("pickups.jsonl.*"):
        rows += [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return rows


def _cpu_rss(pid: int) -> tuple[float, int]:
    """CPU seconds and RSS bytes of one process, from /proc (Linux)."""
    from bench.measure import sample_tree

    sample = sample_tree(pid)
    return sample.cpu_s, sample.rss_bytes


def run(
    *,
    scale: float,
    window_s: float,
    queues: int,
    latency_queues: int,
    out: Path,
    budgets: tuple[float, ...] = BUDGETS_S,
    one_at_a_time: bool = False,
) -> dict:
    """All budgets side by side on one emulator, or (`one_at_a_time`) one budget after
    another, so that a large rate process is the only consumer while it is measured."""
    from bench.measure import EmulatorProcess

    out.mkdir(parents=True, exist_ok=True)
    emulator = EmulatorProcess(patch=True, log_path=out / "emulator.log", scale=True).start()
    try:
        phases = [(b,) for b in budgets] if one_at_a_time else [budgets]
        rows: list[dict[str, Any]] = []
        elapsed: list[float] = []
        for phase in phases:
            result = _run_phase(emulator, phase, scale, window_s, queues, latency_queues, out)
            rows += result["budgets"]
            elapsed.append(result["window_s"])
        return {"scale": scale, "window_s": min(elapsed), "queues": queues, "budgets": rows}
    finally:
        emulator.stop()


def _run_phase(
    emulator: Any,
    budgets: tuple[float, ...],
    scale: float,
    window_s: float,
    queues: int,
    latency_queues: int,
    out: Path,
) -> dict:
    from bench.harness import Harness, stop_processes

    harness = Harness(emulator.endpoint)
    groups: list[Group] = []
    urls: dict[str, str] = {}
    for budget in budgets:
        for kind, count in (("rate", queues), ("latency", latency_queues)):
            names = [f"il{int(budget)}{kind[0]}-{i:04d}" for i in range(count)]
            created = harness.create_queues(names)
            urls.update(dict(zip(names, created, strict=True)))
            groups.append(Group(budget, kind, names, key=f"il{int(budget)}{kind[0]}"))
    try:
        for group in groups:
            _start(group, emulator.endpoint, out, scale=scale)
        return _measure(groups, urls, emulator, harness, scale=scale, window_s=window_s, out=out)
    finally:
        stop_processes([g.proc for g in groups if g.proc], second_signal_after_s=5)


def _wait_consuming(groups: list[Group], emulator: Any, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = emulator.counts()
        if all(_receives(counts, g.key) >= len(g.queues) for g in groups):
            return
        time.sleep(0.5)
    raise RuntimeError("not every process is polling its queues; see the logs")


def _threads(pid: int) -> int:
    from bench.measure import sample_tree

    return sample_tree(pid).threads


def _measure(
    groups: list[Group],
    urls: dict[str, str],
    emulator: Any,
    harness: Any,
    *,
    scale: float,
    window_s: float,
    out: Path,
) -> dict:
    _wait_consuming(groups, emulator)
    wait_s = max(1, round(WAIT_S / scale))
    stop = threading.Event()
    senders = [
        threading.Thread(
            target=_send_loop,
            args=(harness.sqs, urls, g, wait_s + g.budget_s / scale, stop),
            name=f"bench-send-{g.key}",
            daemon=True,
        )
        for g in groups
        if g.kind == "latency"
    ]
    # Warm-up: one message to each rate queue at a random moment of its cycle, so that the
    # queues idle out of step (started together, they would poll in lockstep and a window
    # would count whole cycles), then every one idle again (threshold min(60 s, budget)).
    longest_s = wait_s + max(g.budget_s for g in groups) / scale
    _desynchronise(harness.sqs, urls, [g for g in groups if g.kind == "rate"], longest_s)
    time.sleep(2 * longest_s + wait_s)
    for sender in senders:
        sender.start()
    before, started = emulator.counts(), time.monotonic()
    cpu_before = {g.key: _cpu_rss(g.proc.pid)[0] for g in groups if g.proc}
    time.sleep(window_s)
    after, elapsed = emulator.counts(), time.monotonic() - started
    cpu_rss = {g.key: _cpu_rss(g.proc.pid) for g in groups if g.proc}
    threads = {g.key: _threads(g.proc.pid) for g in groups if g.proc}
    stop.set()
    for sender in senders:
        sender.join(timeout=30)
    time.sleep(longest_s + 2)  # the last sends get picked up
    return _figures(
        groups, before, after, elapsed, cpu_before, (cpu_rss, threads), scale, _pickups(out)
    )


def _figures(
    groups: list[Group],
    before: dict[str, Any],
    after: dict[str, Any],
    elapsed_s: float,
    cpu_before: dict[str, float],
    process: tuple[dict[str, tuple[float, int]], dict[str, int]],
    scale: float,
    pickups: list[dict[str, Any]],
) -> dict:
    cpu_rss, threads = process
    picked = {(p["queue"], round(p["sent"], 6)): p["t"] - p["sent"] for p in pickups}
    rows = []
    for budget in sorted({g.budget_s for g in groups}):
        rate = next(g for g in groups if g.budget_s == budget and g.kind == "rate")
        latency = next(g for g in groups if g.budget_s == budget and g.kind == "latency")
        receives = _receives(after, rate.key) - _receives(before, rate.key)
        per_hour = receives / len(rate.queues) / elapsed_s * 3600 / scale
        found = [picked.get((q, round(t, 6))) for q, t in latency.sent]
        delays = sorted(d * scale for d in found if d is not None)
        cpu_s = cpu_rss[rate.key][0] - cpu_before[rate.key]
        rows.append(
            {
                "idle_latency_s": budget,
                "requests_per_queue_per_hour": round(per_hour, 2),
                "vs_floor": round(per_hour / (3600 / WAIT_S), 3),
                "expected_per_hour": round(3600 / (WAIT_S + budget), 2),
                "sends": len(latency.sent),
                "not_picked_up": sum(1 for d in found if d is None),
                "pickup_p50_s": round(statistics.median(delays), 2) if delays else None,
                "pickup_p95_s": round(delays[int(0.95 * (len(delays) - 1))], 2) if delays else None,
                "pickup_worst_s": round(delays[-1], 2) if delays else None,
                "rate_process_cpu_percent": round(100 * cpu_s / elapsed_s, 2),
                "rate_process_rss_mib": round(cpu_rss[rate.key][1] / 2**20, 1),
                "rate_process_threads": threads[rate.key],
            }
        )
    return {"scale": scale, "window_s": round(elapsed_s, 1), "budgets": rows}


def _table(result: dict) -> str:
    lines = [
        f"scale 1/{result['scale']:g}, window {result['window_s']} s (real-equivalent figures)",
        "idle_latency | req/queue/h | vs floor | expected | sends | lost | p50 s | p95 s | worst s"
        " | CPU % | RSS MiB | threads",
    ]
    for row in result["budgets"]:
        lines.append(
            " | ".join(
                str(row[k])
                for k in (
                    "idle_latency_s",
                    "requests_per_queue_per_hour",
                    "vs_floor",
                    "expected_per_hour",
                    "sends",
                    "not_picked_up",
                    "pickup_p50_s",
                    "pickup_p95_s",
                    "pickup_worst_s",
                    "rate_process_cpu_percent",
                    "rate_process_rss_mib",
                    "rate_process_threads",
                )
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=10.0, help="time divided by this")
    parser.add_argument("--window", type=float, default=120.0, help="counting window, seconds")
    parser.add_argument("--queues", type=int, default=20, help="idle queues per budget")
    parser.add_argument("--latency-queues", type=int, default=24, help="sent-to queues per budget")
    parser.add_argument(
        "--budgets", default="0,60,300", help="comma-separated idle_latency values, full scale"
    )
    parser.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="measure each budget alone (for --queues in the thousands)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path(__file__).parent / "results" / time.strftime("idle-%Y%m%d-%H%M%S")
    result = run(
        scale=args.scale,
        window_s=args.window,
        queues=args.queues,
        latency_queues=args.latency_queues,
        out=out,
        budgets=tuple(float(b) for b in args.budgets.split(",")),
        one_at_a_time=args.one_at_a_time,
    )
    (out / "idle_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    print(_table(result))
    lost = sum(row["not_picked_up"] for row in result["budgets"])
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
