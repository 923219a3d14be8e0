"""Discovery against an SQS stand-in that answers in a fixed time per call (AWS-like latency).

    PYTHONPATH=<checkout> python bench/discovery_latency.py --queues 10000 --latency-ms 20

Run by path (not -m), so that whichever sqsbalancerd PYTHONPATH names is the one measured
(the baseline checkout has no copy of this file). moto answers a GetQueueAttributes in a few
milliseconds of CPU under the GIL, so against it concurrent calls queue up behind each other
and a cold discovery measures the emulator; here every call takes `latency` of waiting and
no CPU, as a call to AWS does, and the figure is the daemon's. Prints JSON: seconds and
calls of a cold refresh and of a warm one (`interval` later on a fake clock, where the
checkout takes one).
"""

from __future__ import annotations

import argparse
import inspect
import json
import threading
import time
from collections import Counter
from typing import Any

ACCOUNT_URL = "https://sqs.us-east-1.amazonaws.com/000000000000"


class SlowSqs:
    """ListQueues pages of 1,000 and GetQueueAttributes, each after `latency_s`."""

    def __init__(self, count: int, latency_s: float) -> None:
        self.urls = [f"{ACCOUNT_URL}/lat-q{n:05d}" for n in range(count)]
        self.latency_s = latency_s
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _call(self, action: str) -> None:
        with self._lock:
            self.calls[action] += 1
        time.sleep(self.latency_s)  # waiting on the network, not computing

    def list_queues(self, **kwargs: Any) -> dict[str, Any]:
        self._call("ListQueues")
        start = int(kwargs.get("NextToken", "0"))
        page: dict[str, Any] = {"QueueUrls": self.urls[start : start + 1000]}
        if start + 1000 < len(self.urls):
            page["NextToken"] = str(start + 1000)
        return page

    def get_queue_attributes(self, QueueUrl: str, AttributeNames: list[str]) -> dict[str, Any]:
        self._call("GetQueueAttributes")
        name = QueueUrl.rsplit("/", 1)[1]
        arn = f"arn:aws:sqs:us-east-1:000000000000:{name}"
        return {"Attributes": {"QueueArn": arn, "VisibilityTimeout": "30"}}


class SteppedClock:
    def __init__(self) -> None:
        self.offset_s = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset_s

    def wall(self) -> float:
        return time.time() + self.offset_s


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/discovery_latency.py")
    parser.add_argument("--queues", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    from sqsbalancerd.config import DiscoverySettings
    from sqsbalancerd.discovery import Discovery

    sqs = SlowSqs(args.queues, args.latency_ms / 1000)
    settings = DiscoverySettings(queue_pattern="^lat-q")
    clock = SteppedClock()
    takes_clock = "clock" in inspect.signature(Discovery).parameters
    extra: dict[str, Any] = {"clock": clock} if takes_clock else {}
    discovery = Discovery(sqs, settings, **extra)  # type: ignore[arg-type]
    rounds: dict[str, Any] = {"queues": args.queues, "latency_ms": args.latency_ms}
    for name in ("cold", "warm"):
        sqs.calls.clear()
        started = time.monotonic()
        result = discovery.discover()
        rounds[name] = {
            "seconds": round(time.monotonic() - started, 2),
            "matched": len(result.matched),
            "calls": dict(sqs.calls),
        }
        clock.offset_s += settings.interval
    print(json.dumps(rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
