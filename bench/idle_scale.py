"""Idle cost (SQS vs the long-poll floor, DynamoDB per instance), scale and discovery."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.consumers.registry import BY_KEY, ConsumerSpec, Launch, start
from bench.harness import Harness, stop_processes, wait_until
from bench.measure import REPO, EmulatorProcess, TreeMonitor, child_env, requests_of
from bench.plan import Plan

logger = logging.getLogger("bench")


def _launch(
    emulator: EmulatorProcess,
    out: Path,
    run_id: str,
    prefix: str,
    urls: list[str],
    plan: Plan,
    **extra: str,
) -> Launch:
    return Launch(
        endpoint=emulator.endpoint,
        run_id=run_id,
        queue_prefix=prefix,
        queue_urls=urls,
        ids_file=out / f"{run_id}.ids",
        log_dir=out,
        wait_s=plan.wait_s,
        is_fast_timings=plan.idle_fast_timings,
        extra_env=dict(extra),
    )


def _keys(launch: Launch, spec: ConsumerSpec) -> list[str]:
    return [launch.access_key(spec, i) for i in range(spec.instances)]


def idle(emulator: EmulatorProcess, plan: Plan, out: Path) -> dict[str, Any]:
    """Three idle groups at once, told apart by access key; counted over one window."""
    harness = Harness(emulator.endpoint)
    many = harness.create_queues([f"idlem-q{i:04d}" for i in range(plan.idle_queues)])
    few = harness.create_queues([f"idlef-q{i:04d}" for i in range(plan.idle_few_queues)])
    for table in ("bench-idle-few", "bench-idle-many3"):
        harness.create_table(table)
    groups = {
        "standalone": (BY_KEY["sqsb"], _launch(emulator, out, "idle-sa", "idlem-q", many, plan)),
        "dynamodb_few": (
            BY_KEY["sqsb-ddb1"],
            _launch(emulator, out, "idle-few", "idlef-q", few, plan),
        ),
        "dynamodb_many_x3": (
            BY_KEY["sqsb-ddb3"],
            _launch(emulator, out, "idle-many3", "idlem-q", many, plan),
        ),
    }
    logger.info(
        "idle: %d and %d empty queues, %s timings, window %g s",
        len(many),
        len(few),
        "fast" if plan.idle_fast_timings else "default",
        plan.idle_window_s,
    )
    processes = {name: start(spec, launch) for name, (spec, launch) in groups.items()}
    try:
        _settle(emulator, groups, plan)
        return _idle_window(emulator, plan, groups, processes)
    finally:
        stop_processes(
            [p for group in processes.values() for p in group],
            timeout_s=plan.wait_s + 15,
            second_signal_after_s=2,
        )


def _settle(emulator: EmulatorProcess, groups: dict[str, Any], plan: Plan) -> None:
    """Until every group polls all its queues (dynamodb: after its rebalance), plus a poll."""

    def polling() -> bool:
        counts = emulator.counts()
        return all(
            requests_of(counts, _keys(launch, spec)).get("sqs:ReceiveMessage", 0)
            >= len(launch.queue_urls)
            for spec, launch in groups.values()
        )

    wait_until(polling, timeout_s=120, every_s=1.0)
    time.sleep(plan.wait_s + 2)


def _idle_window(
    emulator: EmulatorProcess, plan: Plan, groups: dict[str, Any], processes: dict[str, list[Any]]
) -> dict[str, Any]:
    monitor = TreeMonitor([p.pid for p in processes["standalone"]])
    cpu_start = monitor.sample().cpu_s
    emulator.reset()
    started = time.monotonic()
    time.sleep(plan.idle_window_s)
    counts = emulator.counts()
    window_s = time.monotonic() - started
    cpu_s = monitor.sample().cpu_s - cpu_start
    floor_per_queue_hour = 3600 / plan.wait_s
    results: dict[str, Any] = {
        "window_s": round(window_s, 1),
        "wait_s": plan.wait_s,
        "floor_per_queue_hour": floor_per_queue_hour,
    }
    for name, (spec, launch) in groups.items():
        requests = requests_of(counts, _keys(launch, spec))
        sqs = sum(v for k, v in requests.items() if k.startswith("sqs:"))
        dynamodb = sum(v for k, v in requests.items() if k.startswith("dynamodb:"))
        per_queue_hour = sqs / len(launch.queue_urls) / window_s * 3600
        results[name] = {
            "queues": len(launch.queue_urls),
            "instances": spec.instances,
            "requests": requests,
            "sqs_per_queue_hour": round(per_queue_hour, 1),
            "sqs_over_floor": round(per_queue_hour / floor_per_queue_hour, 3),
            "dynamodb_per_instance_minute": round(dynamodb / spec.instances / window_s * 60, 2),
        }
    results["standalone"]["cpu_percent"] = round(cpu_s / window_s * 100, 2)
    results["standalone"]["rss_mb"] = round(monitor.sample().rss_bytes / 2**20, 1)
    return results


def scale(emulator: EmulatorProcess, plan: Plan, out: Path) -> dict[str, Any]:
    """One standalone process; queues added in steps; RSS and threads per step, idle CPU."""
    harness = Harness(emulator.endpoint)
    urls = harness.create_queues([f"scale-q{i:05d}" for i in range(plan.scale_steps[0])])
    launch = _launch(
        emulator, out, "scale", "scale-q", urls, plan, SQSBALANCERD_DISCOVERY__INTERVAL="2"
    )
    processes = start(BY_KEY["sqsb"], launch)
    monitor = TreeMonitor([p.pid for p in processes], every_s=1.0).start()
    points: list[dict[str, Any]] = []
    try:
        time.sleep(plan.scale_settle_s)
        base_threads = monitor.sample().threads - len(urls)
        for count in plan.scale_steps:
            names = [f"scale-q{i:05d}" for i in range(len(urls), count)]
            urls += harness.create_queues(names)
            wait_until(
                lambda n=count: monitor.sample().threads >= base_threads + n,
                timeout_s=90,
                every_s=0.5,
            )
            time.sleep(3)
            sample = monitor.sample()
            points.append(
                {
                    "queues": count,
                    "rss_mb": round(sample.rss_bytes / 2**20, 1),
                    "threads": sample.threads,
                }
            )
            logger.info("  scale: %s", points[-1])
        idle_cpu = _idle_cpu(monitor, emulator, plan.scale_idle_s)
    finally:
        stop_processes(processes, timeout_s=plan.wait_s + 20, second_signal_after_s=2)
        monitor.stop()
    log_text = (out / "scale-sqsb-0.log").read_text(errors="replace")
    return {
        "points": points,
        **idle_cpu,
        "pool_full_warnings": log_text.count("Connection pool is full"),
    }


def _idle_cpu(monitor: TreeMonitor, emulator: EmulatorProcess, window_s: float) -> dict[str, Any]:
    before, emulator_before = monitor.sample().cpu_s, emulator.cpu_s()
    started = time.monotonic()
    time.sleep(window_s)
    elapsed = time.monotonic() - started
    return {
        "idle_window_s": round(elapsed, 1),
        "idle_cpu_percent": round((monitor.sample().cpu_s - before) / elapsed * 100, 2),
        "emulator_cpu_percent": round((emulator.cpu_s() - emulator_before) / elapsed * 100, 1),
    }


def discovery(emulator: EmulatorProcess, plan: Plan, out: Path) -> dict[str, Any]:
    """Create the queues, then time a cold and a warm Discovery.discover() in a child."""
    harness = Harness(emulator.endpoint)
    started = time.monotonic()
    harness.create_queues([f"disc-q{i:05d}" for i in range(plan.discovery_queues)])
    created_s = time.monotonic() - started
    logger.info("discovery: %d queues created in %.1f s", plan.discovery_queues, created_s)
    emulator.reset()
    command = [sys.executable, "-m", "bench.discovery_probe", "--pattern", "^disc-q"]
    env = child_env("discovery-probe", emulator.endpoint)
    answer = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, check=True, timeout=600
    )
    result: dict[str, Any] = json.loads(answer.stdout)
    result["server_requests"] = requests_of(emulator.counts(), ["discovery-probe"])
    result["queues"] = plan.discovery_queues
    return result
