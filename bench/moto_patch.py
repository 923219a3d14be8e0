"""A switchable fix for moto's ReceiveMessage hot spot, applied only in the bench's server.

moto 5.2.x checks each message it is about to return against the queue's retention period
through `SQSBackend.get_queue_attributes(queue, ["MessageRetentionPeriod"])`, which builds
*every* queue attribute first, and three of them (ApproximateNumberOfMessages, ...Delayed,
...NotVisible) scan the whole queue. A receive of ten from an n-deep queue therefore costs
about 30·n message visits: with a few thousand messages queued moto, not the consumer, is
what a benchmark measures. `apply()` replaces that one method with one reading the queue's
integer `message_retention_period` directly, which is the value the original returns
(`_set_attributes` stores MessageRetentionPeriod as an int under that name).

`verify()` checks the claim: for fresh and expired messages, on a standard and a FIFO queue,
the original and the patched method give the same answers, and a full receive returns the
same messages. The server runs it at start when the patch is on and refuses to start if it
fails. `python -m bench --no-moto-patch` runs everything on stock moto.
"""

from __future__ import annotations

from typing import Any

_ORIGINAL: dict[str, Any] = {}


def _fast_is_valid(self: Any, queue_name: str, message: Any) -> bool:
    from moto.core.utils import unix_time

    queue = self.get_queue(queue_name)
    retain_until = int(queue.message_retention_period) + message.sent_timestamp / 1000
    return bool(retain_until > unix_time())


def apply() -> None:
    from moto.sqs.models import SQSBackend

    if "is_valid" not in _ORIGINAL:
        _ORIGINAL["is_valid"] = SQSBackend.is_message_valid_based_on_retention_period
    SQSBackend.is_message_valid_based_on_retention_period = _fast_is_valid


def revert() -> None:
    from moto.sqs.models import SQSBackend

    if "is_valid" in _ORIGINAL:
        SQSBackend.is_message_valid_based_on_retention_period = _ORIGINAL["is_valid"]


def is_applied() -> bool:
    from moto.sqs.models import SQSBackend

    return SQSBackend.is_message_valid_based_on_retention_period is _fast_is_valid


def verify() -> None:
    """Raise AssertionError unless patched and stock moto answer alike (in-process moto)."""
    from moto.sqs.models import SQSBackend

    was_applied = is_applied()
    revert()
    original = SQSBackend.is_message_valid_based_on_retention_period
    try:
        _compare_methods(original)
        stock = _receive_all(patched=False)
        fast = _receive_all(patched=True)
        assert stock == fast, f"receive differs: {stock} != {fast}"
    finally:
        if was_applied:
            apply()
        else:
            revert()


def _compare_methods(original: Any) -> None:
    from moto.sqs.models import SQSBackend

    backend = SQSBackend("us-east-1", "123456789012")
    for name, attributes in (
        ("verify-std", {"MessageRetentionPeriod": "60"}),
        ("verify.fifo", {"FifoQueue": "true", "ContentBasedDeduplication": "true"}),
    ):
        backend.create_queue(name, **attributes)
        for n in range(6):
            kwargs = {"group_id": "g"} if name.endswith(".fifo") else {}
            message = backend.send_message(name, f"body-{n}", **kwargs)
            if n % 2:  # half of them older than the retention period
                message.sent_timestamp -= 10 * 86400 * 1000
            expected = original(backend, name, message)
            actual = _fast_is_valid(backend, name, message)
            assert expected == actual, f"{name}: {expected} != {actual}"


def _receive_all(*, patched: bool) -> list[tuple[str, ...]]:
    from moto.sqs.models import SQSBackend

    if patched:
        apply()
    else:
        revert()
    backend = SQSBackend("us-east-1", "123456789012")
    backend.create_queue("verify-receive")
    for n in range(25):
        backend.send_message("verify-receive", f"body-{n}")
    batches = []
    while True:
        messages = backend.receive_message("verify-receive", 10, 0, 30, ["All"])
        if not messages:
            return batches
        batches.append(tuple(m.body for m in messages))
