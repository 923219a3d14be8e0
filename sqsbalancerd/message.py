"""The message a handler receives; no raw boto3 dicts travel past this module."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import total_ordering
from types import MappingProxyType
from typing import Any

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class TextAttribute(str):
    """A String or Number message attribute: the text, with SQS's data type kept reachable
    (`"42"` with `data_type == "Number"`; custom types such as `"Number.int"` too)."""

    data_type: str

    def __new__(cls, value: str, data_type: str = "String") -> TextAttribute:
        attribute = super().__new__(cls, value)
        attribute.data_type = data_type
        return attribute


class BinaryAttribute(bytes):
    """A Binary message attribute: the bytes, with SQS's data type kept reachable."""

    data_type: str

    def __new__(cls, value: bytes, data_type: str = "Binary") -> BinaryAttribute:
        attribute = super().__new__(cls, value)
        attribute.data_type = data_type
        return attribute


def plain_attributes(raw: Mapping[str, Any]) -> Mapping[str, TextAttribute | BinaryAttribute]:
    """{"tenant": {"DataType": "String", "StringValue": "acme"}} -> {"tenant": "acme"}."""
    plain: dict[str, TextAttribute | BinaryAttribute] = {}
    for name, value in raw.items():
        data_type = str(value.get("DataType", "String"))
        if "BinaryValue" in value:
            plain[name] = BinaryAttribute(bytes(value["BinaryValue"]), data_type)
        else:
            plain[name] = TextAttribute(str(value.get("StringValue", "")), data_type)
    return MappingProxyType(plain)


@total_ordering
@dataclass(frozen=True, slots=True, eq=False)
class Message:
    """One SQS message. Equal, hashed and ordered by (queue_url, message_id), so `set(messages)`
    and dict keys work and a redelivery (new receipt handle) is the same message."""

    body: str
    message_id: str
    receipt_handle: str = field(repr=False)
    queue_url: str
    queue_name: str
    receive_count: int
    sent_at: datetime | None
    attributes: Mapping[str, str]
    # Plain values (TextAttribute / BinaryAttribute); the SQS form is in raw_message_attributes.
    message_attributes: Mapping[str, Any]
    group_id: str | None = None
    raw_message_attributes: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, repr=False)
    # The handler call this is for this message: SQS's receive count plus in-process retries.
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.attempt < self.receive_count:
            object.__setattr__(self, "attempt", self.receive_count)

    @property
    def key(self) -> tuple[str, str]:
        return (self.queue_url, self.message_id)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self.key == other.key

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self.key < other.key

    def __hash__(self) -> int:
        return hash(self.key)

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
    given = raw.get("MessageAttributes")
    # Most messages carry none: share the one empty mapping (this runs per message).
    raw_attributes = MappingProxyType(dict(given)) if given else _EMPTY
    receive_count = int(attributes.get("ApproximateReceiveCount", "1"))
    return Message(
        body=raw.get("Body", ""),
        message_id=raw["MessageId"],
        receipt_handle=raw["ReceiptHandle"],
        queue_url=queue_url,
        queue_name=queue_name,
        receive_count=receive_count,
        sent_at=sent_at,
        attributes=MappingProxyType(dict(attributes)),
        message_attributes=plain_attributes(raw_attributes) if given else _EMPTY,
        group_id=attributes.get("MessageGroupId"),
        raw_message_attributes=raw_attributes,
        attempt=receive_count,
    )
