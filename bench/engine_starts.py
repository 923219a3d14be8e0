"""How long `Engine.set_owned` holds its caller when it is given thousands of new queues.

    python -m bench.engine_starts --queues 2000,10000

The SQS client is a stand-in whose receives wait their WaitTimeSeconds (20 s) like empty
long polls and cost no CPU, so this measures the engine alone, not an emulator. Per size:
seconds until `set_owned` returned, until every queue had made its first receive, and the
longest gap of a thread ticking every 0.1 s meanwhile (the coordinator's stand-in). Run it
with PYTHONPATH=<checkout> to measure another checkout. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Sequence
from typing import Any

from sqsbalancerd.clock import SystemClock
from sqsbalancerd.config import Settings
from sqsbalancerd.discovery import QueueInfo
from sqsbalancerd.engine.consumer import Engine, HandlerSet
from sqsbalancerd.handler import ResolvedHandler
from sqsbalancerd.runtime import ThreadSupervisor
from sqsbalancerd.stats import Stats


class LongPolls:
    def __init__(self) -> None:
        self.end = threading.Event()
        self._lock = threading.Lock()
        self.polled: set[str] = set()

    def receive_message(self, **params: Any) -> dict[str, Any]:
        with self._lock:
            self.polled.add(params["QueueUrl"])
        self.end.wait(params.get("WaitTimeSeconds", 0))
        return {}

    def __getattr__(self, name: str) -> Any:
        return lambda **_: {"Successful": [], "Failed": []}


def measure(size: int, timeout_s: float) -> dict[str, Any]:
    settings = Settings(
        coordination={"mode": "standalone"},
        discovery={"queue_pattern": "^work-"},
        aws={"region": "us-east-1"},
        sqs={"wait_time_seconds": 20},
    )
    handler = ResolvedHandler(path="b:h", function=lambda m: None, is_async=False, is_batch=False)
    sqs, supervisor = LongPolls(), ThreadSupervisor()
    engine = Engine(
        sqs=sqs,  # type: ignore[arg-type]
        settings=settings,
        handlers=HandlerSet(default=handler, by_path={}),
        stats=Stats(),
        clock=SystemClock(),
        spawner=supervisor,
    )
    engine.start()
    gaps: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        last = time.monotonic()
        while not stop.wait(0.1):
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    threading.Thread(target=tick, daemon=True).start()
    queues = [QueueInfo(f"work-{i:05d}", f"https://sqs.local/0/work-{i:05d}") for i in range(size)]
    started = time.monotonic()
    engine.set_owned(queues)
    returned_s = time.monotonic() - started
    deadline = started + timeout_s
    while len(sqs.polled) < size and not stop.wait(0.05) and time.monotonic() < deadline:
        pass
    polling_s = time.monotonic() - started
    stop.set()
    sqs.end.set()
    engine.stop_receiving()
    engine.stop(timeout_s=5)
    supervisor.stop_all(timeout_s=30)
    return {
        "queues": size,
        "set_owned_s": round(returned_s, 2),
        "all_polling_s": round(polling_s, 2) if len(sqs.polled) == size else None,
        "longest_tick_gap_s": round(max(gaps, default=0.0), 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_starts", description=__doc__)
    parser.add_argument("--queues", default="2000,10000")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    runs = [measure(int(n), args.timeout_s) for n in args.queues.split(",")]
    print(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
