"""What the Python comparison consumers share: arguments, the client, stopping on SIGTERM."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from collections.abc import Sequence
from typing import Any

import boto3
from botocore.config import Config


def parse_args(prog: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--queues-file", required=True, help="JSON list of queue URLs")
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--wait-s", type=int, default=20, help="WaitTimeSeconds")
    args = parser.parse_args(argv)
    with open(args.queues_file) as file:
        args.queue_urls = json.load(file)
    return args


def sqs_client(endpoint: str, *, pool: int) -> Any:
    config = Config(
        region_name="us-east-1",
        max_pool_connections=pool,
        read_timeout=40,
        retries={"mode": "standard", "total_max_attempts": 5},
    )
    return boto3.session.Session().client("sqs", endpoint_url=endpoint, config=config)


def stop_event() -> threading.Event:
    """Set on SIGTERM or SIGINT; the consumer finishes its current round and exits."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def wait_threads(threads: list[threading.Thread], stop: threading.Event) -> None:
    while not stop.wait(0.5):
        if not any(t.is_alive() for t in threads):
            return
