"""Message: identity by (queue_url, message_id), plain attribute values, the raw form kept."""

from __future__ import annotations

import base64

import pytest

from sqsbalancerd import BinaryAttribute, Message, TextAttribute
from sqsbalancerd.message import message_from_sqs

RAW = {
    "MessageId": "m-1",
    "ReceiptHandle": "rh-1",
    "Body": "{}",
    "Attributes": {"ApproximateReceiveCount": "2", "SentTimestamp": "1700000000000"},
    "MessageAttributes": {
        "tenant": {"DataType": "String", "StringValue": "acme"},
        "weight": {"DataType": "Number.float", "StringValue": "2.5"},
        "blob": {"DataType": "Binary", "BinaryValue": b"\x00\x01"},
    },
}


def message(raw=None, *, url: str = "https://sqs/q", receipt: str = "rh-1") -> Message:
    data = dict(raw or RAW)
    data["ReceiptHandle"] = receipt
    return message_from_sqs(data, queue_url=url, queue_name="q")


def test_equal_and_hashed_by_queue_and_id_whatever_the_receipt():
    first, again = message(receipt="rh-1"), message(receipt="rh-2")
    other_queue = message(url="https://sqs/other")
    assert first == again and hash(first) == hash(again)
    assert first != other_queue
    assert set([first, again, other_queue]) == {first, other_queue}
    assert {first: "seen"}[again] == "seen"


def test_ordered_by_queue_then_id():
    a = message({**RAW, "MessageId": "a"})
    b = message({**RAW, "MessageId": "b"})
    z = message({**RAW, "MessageId": "a"}, url="https://sqs/z")
    assert sorted([z, b, a]) == [a, b, z]
    with pytest.raises(TypeError):
        _ = a < "a"  # type: ignore[operator]


def test_message_attributes_are_plain_values_with_their_data_type():
    attributes = message().message_attributes
    assert attributes["tenant"] == "acme" and isinstance(attributes["tenant"], TextAttribute)
    assert attributes["weight"] == "2.5" and attributes["weight"].data_type == "Number.float"
    assert float(attributes["weight"]) == 2.5
    assert attributes["blob"] == b"\x00\x01" and isinstance(attributes["blob"], BinaryAttribute)
    assert attributes["blob"].data_type == "Binary"


def test_the_raw_form_stays_available():
    raw = message().raw_message_attributes
    assert raw["tenant"] == {"DataType": "String", "StringValue": "acme"}


def test_attempt_starts_at_the_receive_count():
    assert message().attempt == 2  # ApproximateReceiveCount 2


def test_lean_path_binary_values_become_bytes():
    from sqsbalancerd.dataplane import _decode_blobs

    attributes = {"blob": {"DataType": "Binary", "BinaryValue": base64.b64encode(b"\x07")}}
    _decode_blobs(attributes)
    plain = message({**RAW, "MessageAttributes": attributes}).message_attributes
    assert plain["blob"] == b"\x07"
