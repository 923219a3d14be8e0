"""Opt-in backlog gauge: each owned queue's depth, sampled for autoscaling."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqsbalancerd.aws import describe_error
from sqsbalancerd.discovery import QueueInfo
from sqsbalancerd.observability.metrics import BacklogGauge

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

logger = logging.getLogger(__name__)


class BacklogSampler:
    """Opt-in: each owned queue's depth for autoscaling, one GetQueueAttributes per queue."""

    def __init__(
        self,
        sqs: SQSClient,
        gauge: BacklogGauge,
        *,
        owned: Callable[[], list[QueueInfo]],
        interval_s: float,
    ) -> None:
        self._sqs = sqs
        self._gauge = gauge
        self._owned = owned
        self._interval_s = interval_s
        self._seen: set[str] = set()

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self._interval_s):
            self.run_once()

    def run_once(self) -> None:
        current = {info.name: info for info in self._owned()}
        for name in self._seen - set(current):
            self._gauge.forget(name)
        self._seen = set(current)
        for name, info in current.items():
            try:
                attributes = self._sqs.get_queue_attributes(
                    QueueUrl=info.url,
                    AttributeNames=[
                        "ApproximateNumberOfMessages",
                        "ApproximateNumberOfMessagesNotVisible",
                    ],
                )["Attributes"]
            except Exception as exc:  # a loop boundary: the gauge just goes stale
                logger.debug(
                    "backlog sample failed", extra={"queue": name, "error": describe_error(exc)}
                )
                continue
            self._gauge.set(
                name,
                int(attributes.get("ApproximateNumberOfMessages", 0)),
                int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0)),
            )
