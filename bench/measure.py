"""Measuring from outside: the emulator's process and counters, process trees, id files.

CPU and RSS come from psutil when it is installed, else from /proc (Linux).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
HARNESS_KEY = "harness"


def child_env(
    access_key: str, endpoint: str, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """A consumer's environment: dummy credentials, a region, no metadata probing, loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SQSBALANCERD_", "AWS_"))}
    env.update(
        AWS_ACCESS_KEY_ID=access_key,
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION=REGION,
        AWS_REGION=REGION,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ENDPOINT_URL=endpoint,
        PYTHONPATH=str(REPO),
    )
    env.update(extra or {})
    return env


# -- process trees ----------------------------------------------------------------------


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


HAS_PSUTIL = _has_psutil()
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True, slots=True)
class TreeSample:
    cpu_s: float
    rss_bytes: int
    threads: int


def _proc_tree_pids(pid: int) -> list[int]:
    pids, stack = [], [pid]
    while stack:
        current = stack.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as file:
                    stack.extend(int(c) for c in file.read().split())
        except OSError:
            continue
    return pids


def _proc_sample(pid: int) -> TreeSample:
    cpu = rss = threads = 0.0
    for current in _proc_tree_pids(pid):
        try:
            with open(f"/proc/{current}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is field 3 (state): utime 14, stime 15, cutime 16, cstime 17, threads 20
        cpu += sum(int(fields[i]) for i in (11, 12, 13, 14)) / _TICKS
        threads += int(fields[17])
        rss += int(fields[21]) * _PAGE
    return TreeSample(cpu, int(rss), int(threads))


def _psutil_sample(pid: int) -> TreeSample:
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return TreeSample(0.0, 0, 0)
    cpu = rss = threads = 0.0
    for process in processes:
        try:
            with process.oneshot():
                times = process.cpu_times()
                cpu += times.user + times.system + times.children_user + times.children_system
                rss += process.memory_info().rss
                threads += process.num_threads()
        except psutil.Error:
            continue
    return TreeSample(cpu, int(rss), int(threads))


def sample_tree(pid: int) -> TreeSample:
    return _psutil_sample(pid) if HAS_PSUTIL else _proc_sample(pid)


class TreeMonitor:
    """Samples the trees of some processes every `every_s`; keeps the peak RSS and CPU."""

    def __init__(self, pids: list[int], *, every_s: float = 0.2) -> None:
        self._pids = pids
        self._every_s = every_s
        self._stop = threading.Event()
        self._last: dict[int, TreeSample] = {}
        self.peak_rss_bytes = 0
        self.peak_threads = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)

    def start(self) -> TreeMonitor:
        self.sample()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            self.sample()

    def sample(self) -> TreeSample:
        """Sample now; CPU is the last seen per process (a dead process keeps its total)."""
        with self._lock:
            for pid in self._pids:
                current = sample_tree(pid)
                previous = self._last.get(pid)
                if previous is None or current.cpu_s >= previous.cpu_s:
                    self._last[pid] = current
            total = TreeSample(
                sum(s.cpu_s for s in self._last.values()),
                sum(s.rss_bytes for s in self._last.values()),
                sum(s.threads for s in self._last.values()),
            )
            self.peak_rss_bytes = max(self.peak_rss_bytes, total.rss_bytes)
            self.peak_threads = max(self.peak_threads, total.threads)
            return total

    def stop(self) -> TreeSample:
        self._stop.set()
        self._thread.join(timeout=2)
        return self.sample()


# -- handled ids ------------------------------------------------------------------------


@dataclass
class IdLog:
    """Tails a file of "message-id start-time" lines written by the consumers' handler."""

    path: Path
    _offset: int = 0
    _partial: bytes = b""
    counts: Counter[str] = field(default_factory=Counter)
    first_start: dict[str, float] = field(default_factory=dict)
    first_received: dict[str, float] = field(default_factory=dict)  # when the handler says
    first_at: float | None = None
    last_at: float | None = None

    def poll(self) -> int:
        """Read what was appended; returns the number of new lines."""
        try:
            with open(self.path, "rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return 0
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            message_id, stamp, *received = line.decode().split(" ")
            started = float(stamp)
            if received:
                self.first_received.setdefault(message_id, float(received[0]))
            self.counts[message_id] += 1
            self.first_start.setdefault(message_id, started)
            self.first_at = started if self.first_at is None else min(self.first_at, started)
            self.last_at = started if self.last_at is None else max(self.last_at, started)
        return len(lines)

    def unique_of(self, ids: set[str] | dict[str, float]) -> int:
        return sum(1 for i in ids if i in self.counts)

    def duplicates_of(self, ids: set[str] | dict[str, float]) -> int:
        return sum(self.counts[i] - 1 for i in ids if self.counts.get(i, 0) > 1)


# -- the emulator -----------------------------------------------------------------------


class EmulatorProcess:
    """`python -m bench.emulator` as a child process, and a client for its counters."""

    def __init__(
        self,
        *,
        patch: bool,
        log_path: Path,
        scale: bool = False,
        http: str | None = None,
        threads: int | None = None,
    ) -> None:
        self._patch = patch
        self._scale = scale
        self._http = http  # None: the emulator's default (bench/emulator.py --http)
        self._threads = threads  # waitress's pool (keepalive), None: the emulator's default
        self._log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""

    def start(self) -> EmulatorProcess:
        command = [sys.executable, "-m", "bench.emulator"]
        if not self._patch:
            command.append("--no-moto-patch")
        if self._scale:
            command.append("--scale")
        if self._http:
            command += ["--http", self._http]
        if self._threads:
            command += ["--threads", str(self._threads)]
        log = open(self._log_path, "ab")  # noqa: SIM115 - kept for the child's life
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=child_env(HARNESS_KEY, ""),
            stdout=subprocess.PIPE,
            stderr=log,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the emulator did not start; see {self._log_path}")
        info = json.loads(line)
        self.endpoint = f"http://127.0.0.1:{info['port']}"
        return self

    def _call(self, path: str, payload: dict[str, Any] | None = None, timeout: float = 60) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        method = "POST" if payload is not None or path.endswith("reset") else "GET"
        request = urllib.request.Request(self.endpoint + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def counts(self) -> dict[str, Any]:
        return dict(self._call("/__bench/counts"))

    def reset(self) -> dict[str, Any]:
        return dict(self._call("/__bench/reset"))

    def fill(self, queue: str, count: int) -> tuple[list[str], float]:
        answer = self._call("/__bench/fill", {"queue": queue, "count": count, "body": "{}"})
        return list(answer["ids"]), float(answer["sent_at"])

    def cpu_s(self) -> float:
        assert self.proc is not None
        return sample_tree(self.proc.pid).cpu_s

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def requests_of(counts: dict[str, Any], clients: list[str]) -> dict[str, int]:
    """{"sqs:ReceiveMessage": n, ...} summed over the given access keys."""
    total: Counter[str] = Counter()
    for client in clients:
        for service, actions in counts.get("requests", {}).get(client, {}).items():
            for action, value in actions.items():
                total[f"{service}:{action}"] += value
    return dict(total)


def now() -> float:
    return time.monotonic()
