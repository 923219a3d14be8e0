"""The sample handler `sqsbalancerd demo` runs: a little simulated I/O per message."""

from __future__ import annotations

import logging
import time

from sqsbalancerd.message import Message

logger = logging.getLogger("demo.handler")


def handle(message: Message) -> None:
    data = message.json()
    time.sleep(float(data.get("work_s", 0.02)))  # stands in for a database or HTTP call
    logger.debug("handled", extra={"n": data.get("n")})
