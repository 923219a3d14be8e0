"""One consumer on one workload, measured the same way for every consumer.

Drain: queues preloaded, consumer started, run until every message was handled and
deleted (or the time cap). Steady: the harness sends at a fixed rate while the consumer
runs (light load: latency; many queues: cost per message when batches are small).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.consumers.registry import ConsumerSpec, Launch, start
from bench.harness import Harness, percentile, stop_processes, wait_until
from bench.measure import EmulatorProcess, IdLog, TreeMonitor, requests_of


@dataclass
class Setting:
    """What every run of a section shares."""

    emulator: EmulatorProcess
    harness: Harness
    results_dir: Path
    wait_s: int = 20
    cap_s: float = 60.0


@dataclass
class Workload:
    name: str
    queues: int
    per_queue: int = 0  # drain: messages preloaded per queue
    handler_ms: float = 0.0
    rate_per_s: float = 0.0  # steady: messages per second over all queues
    duration_s: float = 0.0  # steady: how long the harness sends
    in_flight: int = 0  # handlers at once for consumers with a pool (Launch.in_flight)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Run:
    spec: ConsumerSpec
    workload: Workload
    run_id: str
    urls: list[str]
    ids: IdLog
    sent: dict[str, float] = field(default_factory=dict)  # message id -> send time


def _prepare(
    setting: Setting, spec: ConsumerSpec, workload: Workload, profile_out: Path | None = None
) -> tuple[_Run, Launch]:
    run_id = f"{workload.name}-{spec.key}-{random.randrange(16**4):04x}"
    prefix = f"{run_id}-q"
    urls = setting.harness.create_queues([f"{prefix}{i:03d}" for i in range(workload.queues)])
    if spec.mode == "dynamodb":
        setting.harness.create_table(f"bench-{run_id}")
    ids_file = setting.results_dir / f"{run_id}.ids"
    run = _Run(spec, workload, run_id, urls, IdLog(ids_file))
    launch = Launch(
        endpoint=setting.emulator.endpoint,
        run_id=run_id,
        queue_prefix=prefix,
        queue_urls=urls,
        ids_file=ids_file,
        log_dir=setting.results_dir,
        handler_ms=workload.handler_ms,
        wait_s=setting.wait_s,
        profile_out=profile_out,
        in_flight=workload.in_flight,
    )
    return run, launch


def run_drain(
    setting: Setting, spec: ConsumerSpec, workload: Workload, profile_out: Path | None = None
) -> dict[str, Any]:
    run, launch = _prepare(setting, spec, workload, profile_out)
    for url in run.urls:
        name = url.rsplit("/", 1)[-1]
        message_ids, sent_at = setting.emulator.fill(name, workload.per_queue)
        run.sent.update(dict.fromkeys(message_ids, sent_at))
    setting.emulator.reset()
    emulator_cpu = setting.emulator.cpu_s()
    started = time.monotonic()
    processes = start(spec, launch)
    monitor = TreeMonitor([p.pid for p in processes]).start()
    window = _watch_drain(setting, run, monitor, processes, started)
    result = _finish(setting, run, launch, monitor, processes, window)
    result["emulator_cpu_s"] = round(setting.emulator.cpu_s() - emulator_cpu, 2)
    return result


def _watch_drain(
    setting: Setting,
    run: _Run,
    monitor: TreeMonitor,
    processes: list[Any],
    started: float,
) -> dict[str, Any]:
    """Follow the id log; CPU is taken from the first handled message to the drain."""
    total = len(run.sent)
    window: dict[str, Any] = {"capped": True}
    deadline = started + setting.cap_s
    while time.monotonic() < deadline and all(p.poll() is None for p in processes):
        run.ids.poll()
        if "cpu_first" not in window and run.ids.counts:
            window["cpu_first"] = monitor.sample().cpu_s
            window["handled_first"] = run.ids.unique_of(run.sent)
        if run.ids.unique_of(run.sent) >= total:
            window["handled_s"] = time.monotonic() - started
            # Deleted too: nothing visible or in flight (the harness's calls are not counted).
            window["capped"] = not wait_until(
                lambda: setting.harness.depth(run.urls) == 0,
                timeout_s=max(1.0, deadline - time.monotonic()),
                every_s=0.2,
            )
            break
        time.sleep(0.1)
    window["drain_s"] = time.monotonic() - started
    window["cpu_last"] = monitor.sample().cpu_s
    window["handled_last"] = run.ids.unique_of(run.sent)
    return window


def _finish(
    setting: Setting,
    run: _Run,
    launch: Launch,
    monitor: TreeMonitor,
    processes: list[Any],
    window: dict[str, Any],
) -> dict[str, Any]:
    # Drained already: a second SIGTERM skips sqsbalancerd's wait for in-flight long polls.
    # (Not under the profiler: the pollers' threads must end to be in the profile.)
    second = None if launch.profile_out is not None else 2.0
    codes = stop_processes(processes, timeout_s=setting.wait_s + 25, second_signal_after_s=second)
    final = monitor.stop()
    counts = setting.emulator.counts()
    run.ids.poll()
    keys = [launch.access_key(run.spec, i) for i in range(run.spec.instances)]
    left = setting.harness.depth(run.urls)
    setting.harness.delete_queues(run.urls)
    handled = run.ids.unique_of(run.sent)
    in_window = max(1, window["handled_last"] - window.get("handled_first", 0))
    cpu_window = window["cpu_last"] - window.get("cpu_first", window["cpu_last"])
    span = (run.ids.last_at or 0) - (run.ids.first_at or 0)
    requests = requests_of(counts, keys)
    return {
        "consumer": run.spec.key,
        "label": run.spec.label,
        "workload": run.workload.name,
        "sent": len(run.sent),
        "handled": handled,
        "drained": not window["capped"],
        "drain_s": round(window["drain_s"], 2),
        "msgs_per_s": round(handled / span, 1) if span > 0 else None,
        "cpu_s_per_1k": round(cpu_window / in_window * 1000, 3),
        "cpu_s_total": round(final.cpu_s, 2),
        "peak_rss_mb": round(monitor.peak_rss_bytes / 2**20, 1),
        "peak_threads": monitor.peak_threads,
        "requests": requests,
        "requests_per_msg": _per_message(requests, handled),
        "duplicates": run.ids.duplicates_of(run.sent),
        "lost": max(0, len(run.sent) - handled - left),
        "left_in_queue": left,
        "exit_codes": codes,
        "emulator_slow_requests": counts.get("slow_requests", [])[:20],
    }


def _per_message(requests: dict[str, int], handled: int) -> dict[str, float]:
    if not handled:
        return {}
    per = {k: round(v / handled, 4) for k, v in sorted(requests.items()) if k.startswith("sqs:")}
    per["sqs:total"] = round(
        sum(v for k, v in requests.items() if k.startswith("sqs:")) / handled, 4
    )
    return per


def run_steady(setting: Setting, spec: ConsumerSpec, workload: Workload) -> dict[str, Any]:
    """Send at `rate_per_s` for `duration_s` once the consumer polls; latency per message."""
    run, launch = _prepare(setting, spec, workload)
    processes = start(spec, launch)
    _wait_polling(setting, run, launch)
    setting.emulator.reset()
    monitor = TreeMonitor([p.pid for p in processes]).start()
    cpu_start = monitor.sample().cpu_s
    started = time.monotonic()
    _send_steadily(setting.harness, run, workload)
    wait_until(
        lambda: run.ids.poll() >= 0 and run.ids.unique_of(run.sent) >= len(run.sent),
        timeout_s=15,
        every_s=0.1,
    )
    cpu_end = monitor.sample().cpu_s
    window = {
        "capped": run.ids.unique_of(run.sent) < len(run.sent),
        "drain_s": time.monotonic() - started,
        "cpu_first": cpu_start,
        "cpu_last": cpu_end,
        "handled_first": 0,
        "handled_last": run.ids.unique_of(run.sent),
    }
    latencies = [
        (run.ids.first_start[i] - sent) * 1000
        for i, sent in run.sent.items()
        if i in run.ids.first_start
    ]
    dispatch = [
        (run.ids.first_start[i] - run.ids.first_received[i]) * 1000
        for i in run.sent
        if i in run.ids.first_received and i in run.ids.first_start
    ]
    result = _finish(setting, run, launch, monitor, processes, window)
    result.pop("msgs_per_s")
    # Only consumers that report ApproximateFirstReceiveTimestamp (sqsbalancerd's handler):
    # the part of the latency spent inside the consumer, from the emulator's receive stamp.
    result["receive_to_handler_ms_p50"] = _round(percentile(dispatch, 0.50))
    result["receive_to_handler_ms_p99"] = _round(percentile(dispatch, 0.99))
    result["latency_ms_p50"] = _round(percentile(latencies, 0.50))
    result["latency_ms_p99"] = _round(percentile(latencies, 0.99))
    result["latency_ms_p90"] = _round(percentile(latencies, 0.90))
    result["latency_ms_max"] = _round(max(latencies, default=None))
    result["latency_over_500ms"] = sum(1 for ms in latencies if ms > 500)
    return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _wait_polling(setting: Setting, run: _Run, launch: Launch) -> None:
    """Until every queue has seen a ReceiveMessage from this consumer (or 30 s)."""
    keys = [launch.access_key(run.spec, i) for i in range(run.spec.instances)]

    def polling() -> bool:
        counts = requests_of(setting.emulator.counts(), keys)
        return counts.get("sqs:ReceiveMessage", 0) >= len(run.urls)

    wait_until(polling, timeout_s=30, every_s=0.25)
    time.sleep(0.5)


def _send_steadily(harness: Harness, run: _Run, workload: Workload) -> None:
    """Open loop: message k goes out at k / rate seconds, to a random queue (2 threads)."""
    count = int(workload.rate_per_s * workload.duration_s)
    start = time.monotonic() + 0.05
    rng = random.Random(7)
    plan = [(start + k / workload.rate_per_s, rng.choice(run.urls)) for k in range(count)]
    lock = threading.Lock()

    def sender(part: list[tuple[float, str]]) -> None:
        for due, url in part:
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            message_id, sent_at = harness.send_one(url)
            with lock:
                run.sent[message_id] = sent_at

    threads = [threading.Thread(target=sender, args=(plan[i::2],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
