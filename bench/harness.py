"""The harness's own AWS side (access key "harness", counted apart) and process control."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
from botocore.config import Config

from bench.measure import HARNESS_KEY, REGION
from sqsbalancerd.clock import SystemClock
from sqsbalancerd.coordination.table import CoordinationTable


class Harness:
    def __init__(self, endpoint: str) -> None:
        config = Config(region_name=REGION, max_pool_connections=16, read_timeout=60)
        session = boto3.session.Session(
            aws_access_key_id=HARNESS_KEY, aws_secret_access_key="testing", region_name=REGION
        )
        self.sqs: Any = session.client("sqs", endpoint_url=endpoint, config=config)
        self.dynamodb: Any = session.client("dynamodb", endpoint_url=endpoint, config=config)

    def create_queues(self, names: list[str], *, visibility_s: int = 30) -> list[str]:
        attributes = {"VisibilityTimeout": str(visibility_s)}

        def create(name: str) -> str:
            return str(self.sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(create, names))

    def delete_queues(self, urls: Iterable[str]) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda url: self.sqs.delete_queue(QueueUrl=url), urls))

    def depth(self, urls: Iterable[str]) -> int:
        """Visible plus in-flight messages over the queues."""
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        total = 0
        for url in urls:
            attributes = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)
            total += sum(int(attributes["Attributes"][n]) for n in names)
        return total

    def send_one(self, url: str) -> tuple[str, float]:
        sent_at = time.time()
        message_id = self.sqs.send_message(QueueUrl=url, MessageBody="{}")["MessageId"]
        return str(message_id), sent_at

    def create_table(self, name: str) -> None:
        from sqsbalancerd.coordination.table import table_definition

        self.dynamodb.create_table(**table_definition(name))

    def owners(self, table: str, application: str) -> dict[str, str | None]:
        """queue name -> owning instance id (None when the row is free), from the table."""
        reader = CoordinationTable(
            self.dynamodb, table_name=table, application=application, clock=SystemClock()
        )
        return {queue: row.owner for queue, row in reader.ownership().items()}


def stop_processes(
    processes: list[subprocess.Popen[bytes]],
    *,
    timeout_s: float = 20.0,
    second_signal_after_s: float | None = None,
) -> list[int | None]:
    """SIGTERM all, wait, SIGKILL what is left; returns exit codes (None: had to kill).

    `second_signal_after_s`: send SIGTERM again after that long. sqsbalancerd's drain waits
    for in-flight long polls (up to WaitTimeSeconds); a second signal skips that wait, which
    saves ~20 s per stop when the workload is already drained and nothing is measured.
    """
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    if second_signal_after_s is not None:
        wait_until(
            lambda: all(p.poll() is not None for p in processes), timeout_s=second_signal_after_s
        )
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    codes: list[int | None] = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            codes.append(None)
    return codes


def wait_until(predicate: Callable[[], bool], *, timeout_s: float, every_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return predicate()


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]
