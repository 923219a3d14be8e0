"""Taking N ownership rows against a DynamoDB stand-in that answers in a fixed time per call.

    PYTHONPATH=<checkout> python bench/acquire_latency.py --queues 1000,10000 --latency-ms 10

Run by path (not -m), like discovery_latency.py. moto serves a PutItem in milliseconds of
CPU under the GIL, so against it concurrent writes queue behind each other and a start-up
measures the emulator; here every conditional PutItem waits `latency` and costs no CPU, as
a call to AWS does, so the figure is the daemon's: the seconds `Leases` takes to write a
start-up's rows, one at a time (`--concurrency 1`, what every round did before) and
concurrently, and the coordinator rounds of one heartbeat interval (5 s in the e2e test and
startup_scale) that makes. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from typing import Any

from sqsbalancerd.clock import SystemClock
from sqsbalancerd.coordination.leases import Leases
from sqsbalancerd.coordination.rows import OwnershipView
from sqsbalancerd.coordination.table import CoordinationTable

ROUND_S = 5.0
CHUNK_WRITES = 4  # as coordinator.ACQUIRE_CHUNK_WRITES: chunks of 4 x concurrency


class SlowPuts:
    """PutItem with `attribute_not_exists(sk)` (a free row), each after `latency_s`."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.rows: set[str] = set()
        self._lock = threading.Lock()

    def put_item(self, **kwargs: Any) -> dict[str, Any]:
        time.sleep(self.latency_s)  # waiting on the network, not computing
        key = kwargs["Item"]["sk"]["S"]
        with self._lock:
            assert key not in self.rows, key  # each row taken once
            self.rows.add(key)
        return {}


def measure(queues: int, latency_s: float, concurrency: int) -> dict[str, Any]:
    client = SlowPuts(latency_s)
    clock = SystemClock()
    table = CoordinationTable(client, table_name="t", application="a", clock=clock)  # type: ignore[arg-type]
    leases = Leases(
        table, OwnershipView(table), clock=clock, instance_id="a", write_concurrency=concurrency
    )
    names = [f"lat-q{n:05d}" for n in range(queues)]
    chunk = CHUNK_WRITES * concurrency
    started = time.monotonic()
    for start in range(0, queues, chunk):
        part = names[start : start + chunk]
        assert all(leases.acquire_many([(q, f"https://sqs/{q}", None) for q in part]))
    took_s = time.monotonic() - started
    assert len(client.rows) == queues and len(leases.holdings.leases) == queues
    return {
        "queues": queues,
        "latency_ms": latency_s * 1000,
        "concurrency": concurrency,
        "seconds": round(took_s, 2),
        "rows_per_s": round(queues / took_s),
        "rounds_of_5s": math.ceil(took_s / ROUND_S),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queues", default="1000,10000")
    parser.add_argument("--latency-ms", type=float, default=10.0)
    parser.add_argument("--concurrency", default="1,8")
    args = parser.parse_args()
    results = [
        measure(int(n), args.latency_ms / 1000, int(c))
        for n in args.queues.split(",")
        for c in args.concurrency.split(",")
    ]
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
