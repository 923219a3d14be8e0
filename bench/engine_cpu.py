"""The engine's own CPU per message, in process: no emulator, no HTTP, no other process.

    python -m bench.engine_cpu --messages 20000 --handler-ms 0
    python -m bench.engine_cpu --messages 2000 --handler-ms 50
    python -m bench.engine_cpu --messages 8000 --handler-ms 50 --pool-size 40
    PYTHONPATH=/path/to/base python -m bench.engine_cpu ...   # another checkout's engine

A fake SQS client answers at once after a 1 ms sleep (a call's wait, the GIL released) with
full receives until each queue's share is handed out; the real Engine runs its pollers,
workers and acks threads on it. CPU is the process's (`time.process_time`) from
`set_owned` to the last handler call; the per-thread split comes from /proc (Linux). On a
shared box the figures move from run to run: compare two checkouts alternately, several
rounds each (the throughput section measures the whole daemon against its peers).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import resource
import threading
import time
from typing import Any

from sqsbalancerd.clock import SystemClock
from sqsbalancerd.config import Settings
from sqsbalancerd.discovery import QueueInfo
from sqsbalancerd.engine.consumer import Engine, HandlerSet
from sqsbalancerd.handler import ResolvedHandler
from sqsbalancerd.runtime import ThreadSupervisor
from sqsbalancerd.stats import Stats

_TICKS = os.sysconf("SC_CLK_TCK")


class FakeSqs:
    """Receive, delete and change visibility, answered in process."""

    class meta:  # what the engine reads of a boto3 client
        events = None

    def __init__(self, left: dict[str, int]) -> None:
        self._left = left
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def receive_message(
        self, *, QueueUrl: str, MaxNumberOfMessages: int, WaitTimeSeconds: int, **_: Any
    ) -> dict[str, Any]:
        time.sleep(0.001)
        with self._lock:
            count = min(MaxNumberOfMessages, self._left[QueueUrl])
            self._left[QueueUrl] -= count
        if not count:
            time.sleep(WaitTimeSeconds)
            return {}
        now_ms = str(int(time.time() * 1000))
        attributes = {
            "SentTimestamp": now_ms,
            "ApproximateReceiveCount": "1",
            "ApproximateFirstReceiveTimestamp": now_ms,
            "SenderId": "AIDA",
        }
        messages = []
        for _ in range(count):
            i = next(self._ids)
            messages.append(
                {
                    "MessageId": f"m-{i}",
                    "ReceiptHandle": f"rh-{i}",
                    "Body": "{}",
                    "Attributes": attributes,
                }
            )
        return {"Messages": messages}

    def delete_message_batch(self, *, QueueUrl: str, Entries: list[Any]) -> dict[str, Any]:
        time.sleep(0.001)
        return {"Successful": [{"Id": e["Id"]} for e in Entries]}

    def change_message_visibility_batch(
        self, *, QueueUrl: str, Entries: list[Any]
    ) -> dict[str, Any]:
        return self.delete_message_batch(QueueUrl=QueueUrl, Entries=Entries)


def _threads() -> dict[str, tuple[str, float, int]]:
    """tid -> (thread kind, CPU s, voluntary context switches)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/status") as file:
                status = file.read()
        except OSError:
            continue
        switches = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
        kind = names.get(int(tid), "?").split(":")[0].rstrip("0123456789-")
        out[tid] = (kind, (int(fields[11]) + int(fields[12])) / _TICKS, switches)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_cpu")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--handler-ms", type=float, default=0.0)
    parser.add_argument("--queues", type=int, default=4)
    parser.add_argument("--pool-size", type=int, default=10, help="workers.pool_size")
    args = parser.parse_args(argv)
    total, sleep_s = args.messages, args.handler_ms / 1000
    urls = [f"https://sqs.local/000000000000/work-{i}" for i in range(args.queues)]
    left = dict.fromkeys(urls, total // args.queues)
    total = sum(left.values())
    handled = [0]
    lock = threading.Lock()
    done = threading.Event()

    def handler(message: Any) -> None:
        if sleep_s:
            time.sleep(sleep_s)
        with lock:
            handled[0] += 1
            if handled[0] >= total:
                done.set()

    settings = Settings(
        coordination={"mode": "standalone"},  # type: ignore[arg-type]
        discovery={"queue_pattern": "^work-"},  # type: ignore[arg-type]
        aws={"region": "us-east-1"},  # type: ignore[arg-type]
        sqs={"wait_time_seconds": 20},  # type: ignore[arg-type]
        workers={"pool_size": args.pool_size},  # type: ignore[arg-type]
    )
    resolved = ResolvedHandler(path="bench:h", function=handler, is_async=False, is_batch=False)
    engine = Engine(
        sqs=FakeSqs(left),  # type: ignore[arg-type]
        settings=settings,
        handlers=HandlerSet(default=resolved, by_path={}),
        stats=Stats(),
        clock=SystemClock(),
        spawner=ThreadSupervisor(),
    )
    engine.start()
    before, cpu0, t0 = _threads(), time.process_time(), time.monotonic()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    engine.set_owned(
        [QueueInfo(name=u.rsplit("/", 1)[1], url=u, visibility_timeout_s=30) for u in urls]
    )
    if not done.wait(600):
        raise SystemExit("not drained in 600 s")
    cpu1, t1 = time.process_time(), time.monotonic()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for tid, (kind, cpu, switches) in _threads().items():
        _, cpu_before, switches_before = before.get(tid, (kind, 0.0, 0))
        by_kind[kind][0] += cpu - cpu_before
        by_kind[kind][1] += switches - switches_before
    for kind, (cpu, switches) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"  {kind:20s} cpu {cpu:5.2f} s  voluntary switches/msg {switches / total:.2f}")
    print(
        f"handler {args.handler_ms:g} ms: {total} msgs in {t1 - t0:.2f} s "
        f"({total / (t1 - t0):.0f}/s), CPU s per 1,000 msgs {1000 * (cpu1 - cpu0) / total:.4f} "
        f"(user {usage1.ru_utime - usage0.ru_utime:.2f} s, "
        f"sys {usage1.ru_stime - usage0.ru_stime:.2f} s), "
        f"voluntary switches/msg {(usage1.ru_nvcsw - usage0.ru_nvcsw) / total:.2f}"
    )
    engine.stop_receiving()
    engine.stop(2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
