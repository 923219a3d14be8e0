"""The message a handler receives; no raw boto3 dicts travel past this module."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True, slots=True)
class Message:
    body: str
    message_id: str
    receipt_handle: str = field(repr=False)
    queue_url: str
    queue_name: str
    receive_count: int
    sent_at: datetime | None
    attributes: Mapping[str, str]
    message_attributes: Mapping[str, Any]
    group_id: str | None = None

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    @property
    def sent_timestamp_s(self) -> float | None:
        return self.sent_at.timestamp() if self.sent_at else None


def message_from_sqs(raw: Mapping[str, Any], *, queue_url: str, queue_name: str) -> Message:
    """Build a Message from one entry of a ReceiveMessage response."""
    attributes: Mapping[str, str] = raw.get("Attributes") or {}
    sent_ms = attributes.get("SentTimestamp")
    sent_at = datetime.fromtimestamp(int(sent_ms) / 1000, tz=UTC) if sent_ms else None
    return Message(
        body=raw.get("Body", ""),
        message_id=raw["MessageId"],
        receipt_handle=raw["ReceiptHandle"],
        queue_url=queue_url,
        queue_name=queue_name,
        receive_count=int(attributes.get("ApproximateReceiveCount", "1")),
        sent_at=sent_at,
        attributes=MappingProxyType(dict(attributes)),
        message_attributes=MappingProxyType(dict(raw.get("MessageAttributes") or {})),
        group_id=attributes.get("MessageGroupId"),
    )
