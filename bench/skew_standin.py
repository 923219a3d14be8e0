"""The engine alone on the hot-among-idle workload, against an in-process stand-in SQS.

    python -m bench.skew_standin [--neighbours 0,200] [--messages 3000] [--rounds 2]

moto's own cost grows with the long polls it holds (it wakes each one every second), so the
skew bench's "hot queue among 200 idle" ratio mixes the emulator with the daemon. Here the
engine (dispatcher, receivers, workers, acks) runs in this process against a stand-in whose
calls cost a fixed round trip, served one at a time (one moto process), and whose idle long
polls sleep until a send or their end: whatever changes with idle neighbours is the
engine's. Prints, per neighbour count, msgs/s from the first to the last handler start, the
ratio to the hot queue alone, receives per message and the hot queue's receivers at most.
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time
from collections.abc import Sequence
from typing import Any

from sqsbalancerd.clock import SystemClock
from sqsbalancerd.config import Settings
from sqsbalancerd.discovery import QueueInfo
from sqsbalancerd.engine.consumer import Engine, HandlerSet
from sqsbalancerd.handler import ResolvedHandler
from sqsbalancerd.message import Message
from sqsbalancerd.runtime import ThreadSupervisor
from sqsbalancerd.stats import Stats

URL = "https://sqs.us-east-1.amazonaws.com/123456789012/"


class StandInSqs:
    """Just enough SQS for the engine: receive, batch delete, batch visibility change.

    Every call holds one server lock for `service_s` (a single-process emulator serves one
    request at a time) after `latency_s` of round trip outside it.
    """

    def __init__(self, *, service_s: float = 0.002, latency_s: float = 0.005) -> None:
        self._service_s = service_s
        self._latency_s = latency_s
        self._server = threading.Lock()
        self._cond = threading.Condition()
        self._visible: dict[str, list[str]] = {}
        self._ids = itertools.count()
        self.calls: dict[str, int] = {}
        self.received = 0

    def add_queue(self, name: str, messages: int = 0) -> None:
        with self._cond:
            self._visible.setdefault(name, [])
            self._visible[name] += [f"m{next(self._ids)}" for _ in range(messages)]
            self._cond.notify_all()

    def _serve(self, action: str) -> None:
        time.sleep(self._latency_s)
        with self._server:
            self.calls[action] = self.calls.get(action, 0) + 1
            time.sleep(self._service_s)

    def receive_message(self, **kwargs: Any) -> dict[str, Any]:
        name = str(kwargs["QueueUrl"]).rsplit("/", 1)[-1]
        count = int(kwargs.get("MaxNumberOfMessages", 1))
        deadline = time.monotonic() + int(kwargs.get("WaitTimeSeconds", 0))
        self._serve("ReceiveMessage")
        with self._cond:
            while not self._visible[name] and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            taken, self._visible[name] = self._visible[name][:count], self._visible[name][count:]
            self.received += len(taken)
        now_ms = str(int(time.time() * 1000))
        attributes = {"ApproximateReceiveCount": "1", "SentTimestamp": now_ms}
        messages = [
            {"MessageId": i, "ReceiptHandle": f"r-{i}", "Body": "{}", "Attributes": attributes}
            for i in taken
        ]
        return {"Messages": messages} if messages else {}

    def delete_message_batch(self, **kwargs: Any) -> dict[str, Any]:
        self._serve("DeleteMessageBatch")
        return {"Successful": [{"Id": e["Id"]} for e in kwargs["Entries"]], "Failed": []}

    def change_message_visibility_batch(self, **kwargs: Any) -> dict[str, Any]:
        self._serve("ChangeMessageVisibilityBatch")
        return {"Successful": [{"Id": e["Id"]} for e in kwargs["Entries"]], "Failed": []}


def run_once(
    neighbours: int, messages: int, *, pool_size: int, handler_ms: float
) -> dict[str, Any]:
    sqs = StandInSqs()
    starts: list[float] = []
    lock = threading.Lock()

    def handler(message: Message) -> None:
        with lock:
            starts.append(time.monotonic())
        time.sleep(handler_ms / 1000)

    settings = Settings(
        coordination={"mode": "standalone"},
        discovery={"queue_pattern": "^skew-"},
        aws={"region": "us-east-1"},
        workers={"pool_size": pool_size},
    )
    resolved = ResolvedHandler(path="h:h", function=handler, is_async=False, is_batch=False)
    supervisor = ThreadSupervisor()
    engine = Engine(
        sqs=sqs,  # type: ignore[arg-type]
        settings=settings,
        handlers=HandlerSet(default=resolved, by_path={}),
        stats=Stats(),
        clock=SystemClock(),
        spawner=supervisor,
    )
    names = [f"skew-{i:04d}" for i in range(neighbours + 1)]
    for name in names:
        sqs.add_queue(name)
    infos = [QueueInfo(name=n, url=URL + n, visibility_timeout_s=30) for n in names]
    engine.start()
    most_receivers = 0
    try:
        engine.set_owned(infos)
        _wait(lambda: sqs.calls.get("ReceiveMessage", 0) >= len(names), 60)
        time.sleep(0.5)
        receives_before = sqs.calls.get("ReceiveMessage", 0)
        sqs.add_queue(names[0], messages)

        def done() -> bool:
            nonlocal most_receivers
            owned = engine._owned.get(names[0])
            if owned is not None:
                most_receivers = max(most_receivers, len(owned.receivers.pollers))
            return len(starts) >= messages

        _wait(done, 120, every_s=0.05)
        receives = sqs.calls.get("ReceiveMessage", 0) - receives_before
    finally:
        engine.stop_receiving()
        engine.stop(timeout_s=5)
        supervisor.stop_all(timeout_s=10)
    span = max(starts) - min(starts)
    return {
        "neighbours": neighbours,
        "msgs_per_s": round((len(starts) - 1) / span, 1) if span > 0 else None,
        "receives_per_msg": round(receives / messages, 3),
        "most_receivers": most_receivers,
    }


def _wait(predicate: Any, timeout_s: float, every_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("stand-in run did not finish in time")
        time.sleep(every_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.skew_standin", description=__doc__)
    parser.add_argument("--neighbours", default="0,200")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pool-size", type=int, default=50)
    parser.add_argument("--handler-ms", type=float, default=20.0)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.neighbours.split(",")]
    best: dict[int, dict[str, Any]] = {}
    for _ in range(args.rounds):  # interleaved: a busy minute hits every count alike
        for count in counts:
            result = run_once(
                count, args.messages, pool_size=args.pool_size, handler_ms=args.handler_ms
            )
            print(result, flush=True)
            if (result["msgs_per_s"] or 0) > (best.get(count, {}).get("msgs_per_s") or 0):
                best[count] = result
    alone = best[counts[0]]["msgs_per_s"] or 1
    print("| idle neighbours | msgs/s (best) | ÷ first | receives/msg | most hot receivers |")
    print("|---|---|---|---|---|")
    for count, result in best.items():
        rate = result["msgs_per_s"] or 0
        print(
            f"| {count} | {rate} | {rate / alone:.2f}x | {result['receives_per_msg']}"
            f" | {result['most_receivers']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
