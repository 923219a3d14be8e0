"""The engine's in-memory records: what each owned queue holds and how it is consumed."""

from __future__ import annotations

import enum
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqsbalancerd.config import RetrySettings
from sqsbalancerd.discovery import QueueInfo
from sqsbalancerd.message import Message


class DeliveryState(enum.Enum):
    RESERVED = "reserved"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    RELEASED = "released"


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """Effective per-queue settings: global [sqs]/[retry] with the first [[queue]] override."""

    visibility_timeout_s: int
    is_visibility_configured: bool
    wait_time_s: int
    max_messages: int
    max_concurrency: int | None
    max_rate_per_s: float | None
    retry: RetrySettings
    max_extension_s: float
    message_attribute_names: tuple[str, ...]
    handler_timeout_s: float | None = None
    max_receive_count: int | None = None  # the queue's redrive policy's
    idle_latency_s: float = 0.0  # sqs.idle_latency: 0 polls continuously (engine/idle.py)


@dataclass(slots=True, eq=False)
class Delivery:
    """One received message while this process is responsible for it."""

    message: Message
    queue: QueueRuntime
    received_at_s: float
    visible_until_s: float
    state: DeliveryState = DeliveryState.QUEUED
    is_expired: bool = False
    # The one visibility decision taken for this receipt (delete, retry, release, or
    # "lapsed" when its visibility ran out first); extensions stop once it is set.
    decision: str | None = None
    is_settled: bool = False  # its decision reached SQS (or was given up)

    @property
    def is_undecided(self) -> bool:
        return self.decision is None and not self.is_expired

    def is_still_ours(self) -> bool:
        """Held, or handled with its delete not yet sent: a redelivery of it is a duplicate."""
        if self.is_settled:
            return False
        if self.state in (DeliveryState.QUEUED, DeliveryState.RUNNING):
            return not self.is_expired or self.decision == "lapsed"
        return self.decision == "delete"


@dataclass(slots=True, eq=False)
class WorkItem:
    """What one worker runs at once: one message, or a whole batch for batch handlers."""

    queue: QueueRuntime
    deliveries: tuple[Delivery, ...]
    groups: frozenset[str]
    started_at_s: float | None = None
    not_before_s: float = 0.0  # an in-process retry waits for its backoff
    size_bytes: int = 0  # bodies and attributes, for the held-bytes budget
    deadline_s: float | None = None  # started_at_s + handler_timeout
    is_timed_out: bool = False
    # Counted in the timed_out counter (once: the watchdog and the worker both see it).
    is_timeout_counted: bool = False


class TokenBucket:
    """`max_rate` messages per second, bursting to one second's worth."""

    def __init__(self, rate_per_s: float, now_s: float) -> None:
        self._rate = rate_per_s
        self._capacity = max(1.0, rate_per_s)
        self._tokens = self._capacity
        self._updated_s = now_s

    def _refill(self, now_s: float) -> None:
        elapsed = max(0.0, now_s - self._updated_s)
        self._tokens = min(self._capacity, self._tokens + elapsed * self._rate)
        self._updated_s = now_s

    def wait_s(self, count: int, now_s: float) -> float:
        """0 when `count` tokens are there now, else how long until they are."""
        self._refill(now_s)
        needed = min(float(count), self._capacity) - self._tokens
        return 0.0 if needed <= 0 else needed / self._rate

    def take(self, count: int, now_s: float) -> None:
        self._refill(now_s)
        self._tokens -= min(float(count), self._capacity)


@dataclass(slots=True, eq=False)
class QueueRuntime:
    info: QueueInfo
    policy: QueuePolicy
    invoke: Callable[[Any], Any]
    is_batch: bool
    is_async: bool
    queued: deque[WorkItem] = field(default_factory=deque)
    held: int = 0
    running_items: int = 0
    running_groups: set[str] = field(default_factory=set)
    is_stopping: bool = False
    is_gone: bool = False
    rate: TokenBucket | None = None
    handler_path: str = ""
    polling: int = 0  # room reserved by polls in flight (part of `held`)
    last_received_s: float = -1e9
    # FIFO messages whose attempts are spent, until SQS redrives them: message id -> until_s.
    exhausted: dict[str, float] = field(default_factory=dict)
    # Deliveries not yet settled, by message id: a message received again is matched here.
    by_message_id: dict[str, Delivery] = field(default_factory=dict)
    # Several receivers may match the same redelivery at once (see engine/receivers.py).
    receive_lock: threading.Lock = field(default_factory=threading.Lock)
    # info.name and info.url as plain attributes: read several times per message.
    name: str = field(init=False)
    url: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.info.name
        self.url = self.info.url

    def forget_delivery(self, delivery: Delivery) -> None:
        key = delivery.message.message_id
        if self.by_message_id.get(key) is delivery:
            self.by_message_id.pop(key, None)

    def mark_exhausted(self, message_id: str, now_s: float) -> None:
        # Long enough for it to come back and be bounced a few times; refreshed each time.
        self.exhausted[message_id] = now_s + 2 * self.policy.visibility_timeout_s + 60.0

    def is_exhausted(self, message_id: str, now_s: float) -> bool:
        until_s = self.exhausted.get(message_id)
        if until_s is None:
            return False
        if until_s < now_s:
            del self.exhausted[message_id]
            return False
        return True

    def has_exhausted(self, now_s: float) -> bool:
        for message_id in list(self.exhausted):
            self.is_exhausted(message_id, now_s)
        return bool(self.exhausted)


def size_of(delivery: Delivery) -> int:
    """Roughly what a message costs in memory: its body and attribute values."""
    message = delivery.message
    if not message.message_attributes:
        return len(message.body)
    return len(message.body) + sum(len(v) for v in message.message_attributes.values())
