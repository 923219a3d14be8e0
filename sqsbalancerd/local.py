"""The embedded emulator: moto's server on loopback, for trying sqsbalancerd with no AWS.

Needs the `local` extra (`pip install "sqsbalancerd[local]"`).
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqsbalancerd.aws import AwsOptions, dynamodb_client, sqs_client
from sqsbalancerd.errors import SqsBalancerError

LOOPBACK = "127.0.0.1"
DUMMY_REGION = "us-east-1"
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": DUMMY_REGION,
    "AWS_REGION": DUMMY_REGION,
    # Without this, botocore may probe the instance-metadata address for credentials.
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def emulator_env(endpoint_url: str) -> dict[str, str]:
    """Environment that points sqsbalancerd (and boto3) at the emulator, with dummy keys."""
    return {**DUMMY_ENV, "AWS_ENDPOINT_URL": endpoint_url}


@dataclass
class LocalEmulator:
    """moto's threaded server on 127.0.0.1; `port=0` picks a free one."""

    port: int = 0
    _server: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> LocalEmulator:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:
            raise SqsBalancerError(
                'the local emulator needs the "local" extra: pip install "sqsbalancerd[local]"'
            ) from exc
        if self.port == 0:
            self.port = free_port()
        from sqsbalancerd import moto_fixes

        moto_fixes.apply()  # one receiver per message, no lost deletes: as SQS, unlike moto
        # werkzeug logs every request at INFO; the emulator's traffic is not the user's news.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address=LOOPBACK, port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> LocalEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def options(self) -> AwsOptions:
        return AwsOptions(
            region=DUMMY_REGION,
            endpoint_url=self.endpoint_url,
            access_key_id="testing",
            secret_access_key="testing",
        )

    def sqs(self) -> Any:
        return sqs_client(self.options())

    def dynamodb(self) -> Any:
        return dynamodb_client(self.options())


def create_queues(
    sqs: Any, names: Iterable[str], *, dead_letter: bool = True, max_receive_count: int = 5
) -> dict[str, str]:
    """Create queues (each with its own `-dlq` and a redrive policy); name -> URL."""
    urls: dict[str, str] = {}
    for name in names:
        attributes: dict[str, str] = {}
        fifo = name.endswith(".fifo")
        if fifo:
            attributes["FifoQueue"] = "true"
            attributes["ContentBasedDeduplication"] = "true"
        if dead_letter:
            dlq_name = name.removesuffix(".fifo") + "-dlq" + (".fifo" if fifo else "")
            dlq_attrs = {"FifoQueue": "true"} if fifo else {}
            dlq_url = sqs.create_queue(QueueName=dlq_name, Attributes=dlq_attrs)["QueueUrl"]
            arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])
            attributes["RedrivePolicy"] = json.dumps(
                {
                    "deadLetterTargetArn": arn["Attributes"]["QueueArn"],
                    "maxReceiveCount": str(max_receive_count),
                }
            )
        urls[name] = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    return urls


def send_messages(sqs: Any, queue_url: str, bodies: Iterable[str]) -> int:
    """Send in batches of ten; returns how many were sent."""
    batch: list[dict[str, str]] = []
    sent = 0
    for body in bodies:
        batch.append({"Id": str(len(batch)), "MessageBody": body})
        if len(batch) == 10:
            sent += _send_batch(sqs, queue_url, batch)
            batch = []
    if batch:
        sent += _send_batch(sqs, queue_url, batch)
    return sent


def _send_batch(sqs: Any, queue_url: str, batch: list[dict[str, str]]) -> int:
    response = sqs.send_message_batch(QueueUrl=queue_url, Entries=batch)
    return len(response.get("Successful", []))
