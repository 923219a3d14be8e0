"""Helpers shared by the tests: bounded waits, a fake clock, recorded handler events."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def wait_until(predicate: Callable[[], Any], *, timeout_s: float = 10.0, every_s: float = 0.02,
               what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, start_s: float = 1000.0, wall_s: float = 1_700_000_000.0) -> None:
        self.now_s = start_s
        self.wall_offset_s = wall_s - start_s

    def monotonic(self) -> float:
        return self.now_s

    def wall(self) -> float:
        return self.now_s + self.wall_offset_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def read_events(path: Path) -> list[dict[str, Any]]:
    """JSON lines written by tests/handlers.py (one file per process, appended atomically)."""
    events: list[dict[str, Any]] = []
    for file in sorted(path.parent.glob(path.name + "*")) if path.parent.exists() else []:
        for line in file.read_text().splitlines():
            if line.strip():
                events.append(json.loads(line))
    return sorted(events, key=lambda e: e["t"])


def queue_depth(sqs: Any, url: str) -> tuple[int, int]:
    attributes = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (int(attributes["ApproximateNumberOfMessages"]),
            int(attributes["ApproximateNumberOfMessagesNotVisible"]))
