"""One contender on one skewed workload: queues polled first, then the burst, then the drain.

Every run: create the queues (empty), start the contender, wait until it has long-polled
every queue, zero the emulator's counters, put the workload's messages in (the hot tenant's
burst lands on a daemon that already runs), and follow the drain with the shared harness
(`bench.runs`): msgs/s from the first to the last handler start, CPU from the first handled
message, SQS requests per message counted server-side from the reset (start-up and the idle
queues' first long polls are reported apart, as `startup_requests`).

A contender is a consumer plus the checkout its code comes from: "before" runs
`sqsbalancerd run` from a checkout of the engine as it was before issue 12 (its own venv),
so both engines meet the same emulator in the same run.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.consumers.registry import ConsumerSpec, Launch, sqsbalancerd_env
from bench.harness import stop_processes, wait_until
from bench.measure import (
    HARNESS_KEY,
    REPO,
    EmulatorProcess,
    IdLog,
    TreeMonitor,
    child_env,
    requests_of,
)
from bench.runs import Setting, Workload, _finish, _Run, _watch_drain

METRICS = ("work_queue_depth", "workers_busy")
SCRAPE = True  # each scrape costs the daemon CPU that grows with its queues: off for A/B
# Seconds between scrapes. A scrape of 200 owned queues costs the daemon ~30 ms of CPU:
# every 50 ms that was ~60 % of a core, so only the fan-out (peak held against the bound)
# scrapes that often; elsewhere the peaks are indicative.
SCRAPE_EVERY_S = 1.0
_METRIC_LINE = re.compile(r"^sqsbalancerd_(\w+) ([0-9.eE+-]+)$", re.MULTILINE)


class SkewEmulator(EmulatorProcess):
    """`python -m bench.skew_emulator`: bench.emulator with moto's deletes made atomic (a
    lost concurrent delete resurrected messages, see that module), `--scale` for quiet
    long polls."""

    def __init__(self, *, log_path: Path, quiet: bool) -> None:
        super().__init__(patch=True, log_path=log_path, scale=quiet)
        self._quiet = quiet

    def start(self) -> SkewEmulator:
        command = [sys.executable, "-m", "bench.skew_emulator"]
        if self._quiet:
            command.append("--scale")
        log = open(self._log_path, "ab")  # noqa: SIM115 - kept for the child's life
        self.proc = subprocess.Popen(
            command, cwd=REPO, env=child_env(HARNESS_KEY, ""), stdout=subprocess.PIPE, stderr=log
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the emulator did not start; see {self._log_path}")
        self.endpoint = f"http://127.0.0.1:{json.loads(line)['port']}"
        return self


@dataclass(frozen=True)
class Contender:
    spec: ConsumerSpec
    root: Path  # the checkout that runs: cwd and PYTHONPATH
    python: str  # its interpreter (a venv's)
    fixed_handler_ms: float | None = None  # the emulator ceiling records without sleeping


@dataclass
class SkewLoad:
    name: str
    fill: list[int]  # messages per queue; 0: an idle queue
    handler_ms: float
    pool_size: int = 10
    settings: dict[str, str] = field(default_factory=dict)  # extra SQSBALANCERD_* (after only)

    @property
    def total(self) -> int:
        return sum(self.fill)


class MetricsPeak:
    """Scrapes a daemon's /metrics every SCRAPE_EVERY_S; keeps the peak of each gauge in
    METRICS."""

    def __init__(self, port: int) -> None:
        self._url = f"http://127.0.0.1:{port}/metrics"
        self.peaks: dict[str, float] = {}
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-metrics", daemon=True)

    def start(self) -> MetricsPeak:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_EVERY_S):
            try:
                with urllib.request.urlopen(self._url, timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                continue
            self.scrapes += 1
            for name, value in _METRIC_LINE.findall(text):
                if name in METRICS:
                    self.peaks[name] = max(self.peaks.get(name, 0.0), float(value))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(timeout=3)
        return dict(self.peaks)


def start_contender(
    contender: Contender, launch: Launch, load: SkewLoad
) -> tuple[list[subprocess.Popen[bytes]], int | None]:
    """The contender's process and, for sqsbalancerd, its metrics port."""
    spec = contender.spec
    queues_file = launch.log_dir / f"{launch.run_id}-queues.json"
    queues_file.write_text(json.dumps(launch.queue_urls))
    extra: dict[str, str] = {}
    port = None
    if spec.is_sqsbalancerd:
        extra = sqsbalancerd_env(spec, launch, 0)
        extra["SQSBALANCERD_WORKERS__POOL_SIZE"] = str(load.pool_size)
        if contender.root == REPO:
            extra.update(load.settings)
        port = int(extra["SQSBALANCERD_OBSERVABILITY__HTTP_PORT"])
        command = [contender.python, "-m", "sqsbalancerd", "run"]
        if launch.profile_out is not None:
            profiler = ["-m", "bench.profile_daemon", str(launch.profile_out), "run"]
            command = [contender.python, *profiler]
    else:
        command = [contender.python, "-m", spec.module, "--endpoint", launch.endpoint]
        command += ["--queues-file", str(queues_file), "--wait-s", str(launch.wait_s)]
        command += [*spec.args]
        if spec.module.endswith("batched"):
            command += ["--workers", str(load.pool_size)]
    handler_ms = load.handler_ms if contender.fixed_handler_ms is None else 0.0
    env = child_env(
        launch.access_key(spec, 0),
        launch.endpoint,
        {
            "BENCH_IDS_FILE": str(launch.ids_file),
            "BENCH_HANDLER_MS": str(handler_ms),
            **extra,
            # The contender's own checkout first: "before" must not import this one.
            "PYTHONPATH": str(contender.root),
        },
    )
    log = open(launch.log_dir / f"{launch.run_id}.log", "wb")  # noqa: SIM115 - child's life
    process = subprocess.Popen(
        command, cwd=contender.root, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    return [process], port


def wait_polling(setting: Setting, keys: list[str], queues: int, timeout_s: float) -> float:
    """Seconds until the contender has long-polled every queue once (or the timeout)."""
    started = time.monotonic()

    def polling() -> bool:
        try:
            counts = requests_of(setting.emulator.counts(), keys)
        except OSError:  # moto too busy to answer (thousands of open long polls)
            return False
        return counts.get("sqs:ReceiveMessage", 0) >= queues

    wait_until(polling, timeout_s=timeout_s, every_s=0.25)
    return time.monotonic() - started


def _fill(setting: Setting, urls: list[str], load: SkewLoad) -> dict[str, float]:
    jobs = [(url.rsplit("/", 1)[-1], n) for url, n in zip(urls, load.fill, strict=True) if n]
    sent: dict[str, float] = {}
    with ThreadPoolExecutor(8) as pool:
        for ids, at in pool.map(lambda job: setting.emulator.fill(*job), jobs):
            sent.update(dict.fromkeys(ids, at))
    return sent


def run_skew(
    setting: Setting, contender: Contender, load: SkewLoad, profile_out: Path | None = None
) -> dict[str, Any]:
    spec = contender.spec
    run_id = f"{load.name}-{spec.key}-{random.randrange(16**4):04x}"
    prefix = f"{run_id}-q"
    urls = setting.harness.create_queues([f"{prefix}{i:04d}" for i in range(len(load.fill))])
    ids_file = setting.results_dir / f"{run_id}.ids"
    workload = Workload(load.name, len(urls), handler_ms=load.handler_ms)
    run = _Run(spec, workload, run_id, urls, IdLog(ids_file))
    launch = Launch(
        endpoint=setting.emulator.endpoint,
        run_id=run_id,
        queue_prefix=prefix,
        queue_urls=urls,
        ids_file=ids_file,
        log_dir=setting.results_dir,
        handler_ms=load.handler_ms,
        wait_s=setting.wait_s,
        profile_out=profile_out,
    )
    keys = [launch.access_key(spec, 0)]
    setting.emulator.reset()
    processes, port = start_contender(contender, launch, load)
    monitor = TreeMonitor([p.pid for p in processes]).start()
    polling_s = wait_polling(setting, keys, len(urls), timeout_s=60 + len(urls) / 20)
    time.sleep(0.5)
    startup = requests_of(setting.emulator.reset(), keys)
    metrics = MetricsPeak(port).start() if port and SCRAPE else None
    emulator_cpu = setting.emulator.cpu_s()
    started = time.monotonic()
    run.sent.update(_fill(setting, urls, load))
    # Filling 1,000 queues over HTTP takes moto a while when it also serves 1,000 long
    # polls: the time cap counts from the end of the fill (drain_s still from its start).
    fill_s = time.monotonic() - started
    watch = dataclasses.replace(setting, cap_s=setting.cap_s + fill_s)
    # Idle queues never get a message: checking them for the drain cost the harness one
    # GetQueueAttributes each (200 serial calls on a loaded moto, seconds a sweep), and a
    # drain stretched past WaitTimeSeconds counted every idle queue's re-poll against the
    # contender. The harness still checks every queue once at the end (left_in_queue).
    busy = [url for url, n in zip(urls, load.fill, strict=True) if n]
    window = _watch_drain(watch, dataclasses.replace(run, urls=busy), monitor, processes, started)
    result = _finish(setting, run, launch, monitor, processes, window)
    result.update(
        contender=spec.key,
        queues=len(urls),
        busy_queues=sum(1 for n in load.fill if n),
        pool_size=load.pool_size,
        handler_ms=load.handler_ms,
        polling_s=round(polling_s, 1),
        fill_s=round(fill_s, 1),
        startup_requests=startup,
        emulator_cpu_s=round(setting.emulator.cpu_s() - emulator_cpu, 2),
    )
    if metrics is not None:
        peaks = metrics.stop()
        result["peak_held"] = peaks.get("work_queue_depth")
        result["peak_busy"] = peaks.get("workers_busy")
        result["metrics_scrapes"] = metrics.scrapes
    return result


def run_idle(setting: Setting, contender: Contender, count: int, window_s: float) -> dict[str, Any]:
    """`count` empty queues owned by one process: RSS, threads and CPU while idle."""
    spec = contender.spec
    run_id = f"idle{count}-{spec.key}-{random.randrange(16**4):04x}"
    started = time.monotonic()
    urls = setting.harness.create_queues([f"{run_id}-q{i:05d}" for i in range(count)])
    created_s = time.monotonic() - started
    launch = Launch(
        endpoint=setting.emulator.endpoint,
        run_id=run_id,
        queue_prefix=f"{run_id}-q",
        queue_urls=urls,
        ids_file=setting.results_dir / f"{run_id}.ids",
        log_dir=setting.results_dir,
        wait_s=setting.wait_s,
    )
    keys = [launch.access_key(spec, 0)]
    setting.emulator.reset()
    processes, _ = start_contender(contender, launch, SkewLoad(run_id, [0] * count, 0.0))
    monitor = TreeMonitor([p.pid for p in processes], every_s=1.0).start()
    try:
        polling_s = wait_polling(setting, keys, count, timeout_s=240)
        counts = _counts_or_none(setting, keys) or {}
        time.sleep(3)
        _counts_or_none(setting, keys, reset=True)
        before, emulator_before = monitor.sample().cpu_s, setting.emulator.cpu_s()
        window_started = time.monotonic()
        time.sleep(window_s)
        elapsed = time.monotonic() - window_started
        sample = monitor.sample()
        window = _counts_or_none(setting, keys)
    finally:
        stop_processes(processes, timeout_s=setting.wait_s + 30, second_signal_after_s=2)
        monitor.stop()
    setting.harness.delete_queues(urls)
    return {
        "contender": spec.key,
        "queues": count,
        "create_s": round(created_s, 1),
        "polling_s": round(polling_s, 1),
        "polled_all": counts.get("sqs:ReceiveMessage", 0) >= count,
        "receives_at_start": counts.get("sqs:ReceiveMessage", 0),
        "rss_mb": round(sample.rss_bytes / 2**20, 1),
        "peak_rss_mb": round(monitor.peak_rss_bytes / 2**20, 1),
        "threads": sample.threads,
        "idle_window_s": round(elapsed, 1),
        "idle_cpu_percent": round((sample.cpu_s - before) / elapsed * 100, 2),
        "emulator_cpu_percent": round(
            (setting.emulator.cpu_s() - emulator_before) / elapsed * 100, 1
        ),
        "window_requests": window,
    }


def _counts_or_none(
    setting: Setting, keys: list[str], *, reset: bool = False
) -> dict[str, int] | None:
    """The contender's counters; None when moto, holding thousands of polls, cannot answer."""
    try:
        snapshot = setting.emulator.reset() if reset else setting.emulator.counts()
    except OSError:
        return None
    return requests_of(snapshot, keys)
