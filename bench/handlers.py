"""The handler every consumer runs: note (message id, start time), then sleep like I/O.

Configured by environment variables the harness sets for each consumer process:
BENCH_IDS_FILE (one "message-id unix-time" line is appended per call, with one O_APPEND
write, so threads and processes can share the file) and BENCH_HANDLER_MS.
"""

from __future__ import annotations

import os
import time
from typing import Any

_state: dict[str, Any] = {}


def _setup() -> tuple[int, float]:
    if "fd" not in _state:
        path = os.environ["BENCH_IDS_FILE"]
        _state["fd"] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _state["sleep_s"] = float(os.environ.get("BENCH_HANDLER_MS", "0")) / 1000
    return _state["fd"], _state["sleep_s"]


def record(message_id: str, received_ms: str | None = None) -> None:
    """Work of a handler: record the id and the time, then the configured sleep.

    `received_ms` (the ApproximateFirstReceiveTimestamp the emulator stamped) adds a third
    column, so receive-to-handler time can be told from send-to-receive time.
    """
    fd, sleep_s = _setup()
    extra = f" {int(received_ms) / 1000:.3f}" if received_ms else ""
    os.write(fd, f"{message_id} {time.time():.6f}{extra}\n".encode())
    if sleep_s:
        time.sleep(sleep_s)


def handle(message: Any) -> None:
    """sqsbalancerd handler (`--handler bench.handlers:handle`)."""
    record(message.message_id, message.attributes.get("ApproximateFirstReceiveTimestamp"))
