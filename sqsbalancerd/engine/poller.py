"""One long-polling receiver per owned queue.

A poller asks the dispatcher for room before it receives, so it never takes messages
this process cannot start while it holds them; what a receive returns after receiving
stopped is released at once instead of waiting in memory for its visibility to run out.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from sqsbalancerd.aws import describe_error, error_code, is_transient
from sqsbalancerd.clock import Clock
from sqsbalancerd.engine.acks import BATCH_LIMIT, Acknowledger
from sqsbalancerd.engine.dispatch import Dispatcher
from sqsbalancerd.engine.state import Delivery, QueueRuntime, WorkItem
from sqsbalancerd.message import message_from_sqs
from sqsbalancerd.stats import Stats

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

logger = logging.getLogger(__name__)

_QUEUE_GONE = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
_MAX_BACKOFF_S = 30.0
# Longest a poller waits for a heartbeat renewal that is about to lengthen its budget.
RENEWAL_WAIT_S = 2.0
# Backpressure from the acknowledger: while this many of a queue's deletes/visibility changes
# wait to be sent, receive no more from it. Otherwise a slow or throttled delete path lets
# handled-but-undeleted messages outlive their visibility timeout and come back, by the
# thousand (each redelivery adding to the backlog).
MAX_PENDING_ACKS = 2 * BATCH_LIMIT  # for this queue
MAX_PENDING_ACKS_TOTAL = 10 * BATCH_LIMIT  # for all queues: one thread sends them
_ACKS_BEHIND_WAIT_S = 0.05


class ReceiveFenced(Exception):
    """A receive attempt (a retry, or the lean path's fallback) found the budget spent."""


class ReceiveGate:
    """Whether receiving is allowed now, and for how long a long poll may last.

    Coordination pauses it (self-fencing) and bounds each poll by the time left on the
    lease, so a poll never outlives the right to receive.
    """

    def __init__(self) -> None:
        self._resumed = threading.Event()
        self._resumed.set()
        self._budget_s: Callable[[], float | None] = lambda: None
        self._renewal_due_in_s: Callable[[], float | None] = lambda: None
        self._renewed = threading.Condition()

    def pause(self) -> None:
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    @property
    def is_paused(self) -> bool:
        return not self._resumed.is_set()

    def wait_resumed(self, timeout_s: float) -> bool:
        return self._resumed.wait(timeout_s)

    def set_budget(
        self,
        budget_s: Callable[[], float | None],
        renewal_due_in_s: Callable[[], float | None] | None = None,
    ) -> None:
        self._budget_s = budget_s
        self._renewal_due_in_s = renewal_due_in_s or (lambda: None)

    def notify_renewed(self) -> None:
        with self._renewed:
            self._renewed.notify_all()

    def wait_time_s(self, wanted_s: int, *, is_idle: bool = True) -> int | None:
        """The WaitTimeSeconds to use now; None when no receive may start.

        Only an idle queue's poller waits for an imminent renewal: its poll would sit out
        the whole wait, so a cut one costs an extra request. A busy queue's receive returns
        at once whatever its WaitTimeSeconds, and waiting would only stall it.
        """
        budget = self._budget_s()
        if budget is None:
            return wanted_s
        if is_idle and int(budget) - 1 < wanted_s:
            budget = self._after_imminent_renewal(budget)
        allowed = int(budget) - 1  # a second's slack for the request's own round trip
        return None if allowed < 0 else min(wanted_s, allowed)

    def check_attempt(self, request: Any = None, **_: Any) -> None:
        """botocore's `before-send` hook for ReceiveMessage: every attempt — the first one
        through boto3, each of its retries, the fallback after a failed lean request — must
        still fit in the budget, or the retry would receive after we may be judged dead."""
        budget = self._budget_s()
        if budget is None:
            return
        if int(budget) - 1 < _wait_time_of(request):
            raise ReceiveFenced(f"receive budget spent ({budget:.1f}s left)")

    def _after_imminent_renewal(self, budget: float) -> float:
        """A renewal due in a moment restores the full budget: a short wait for it keeps
        polls long (cut polls would cost up to twice the idle requests)."""
        due_s = self._renewal_due_in_s()
        if due_s is None or not 0 <= due_s <= RENEWAL_WAIT_S:
            return budget
        with self._renewed:
            self._renewed.wait(due_s + 1.0)
        renewed = self._budget_s()
        return budget if renewed is None else renewed


def _wait_time_of(request: Any) -> int:
    """WaitTimeSeconds of a prepared ReceiveMessage (JSON protocol); 0 if unreadable."""
    try:
        body = request.body
        params = json.loads(body.decode() if isinstance(body, bytes) else body or "{}")
        return int(params.get("WaitTimeSeconds", 0))
    except (AttributeError, TypeError, ValueError):
        return 0


def fence_receive_attempts(sqs: Any, gate: ReceiveGate) -> None:
    """Check the gate before every ReceiveMessage attempt botocore makes on this client."""
    events = getattr(getattr(sqs, "meta", None), "events", None)
    if events is not None:
        events.register(
            "before-send.sqs.ReceiveMessage",
            gate.check_attempt,
            unique_id=f"sqsbalancerd-fence-{id(gate)}",
        )


class Poller:
    def __init__(
        self,
        queue: QueueRuntime,
        *,
        sqs: SQSClient,
        dispatcher: Dispatcher,
        acks: Acknowledger,
        gate: ReceiveGate,
        stats: Stats,
        clock: Clock,
        on_gone: Callable[[QueueRuntime], None],
    ) -> None:
        self.queue = queue
        self._sqs = sqs
        self._dispatcher = dispatcher
        self._acks = acks
        self._gate = gate
        self._stats = stats
        self._clock = clock
        self._on_gone = on_gone
        fence_receive_attempts(sqs, gate)
        self._failures = 0
        self._is_idle = True  # the last receive returned nothing
        self.last_tick_s = clock.monotonic()

    def run(self, stop: threading.Event) -> None:
        while not (
            stop.is_set()
            or self.queue.is_stopping
            or self.queue.is_gone
            or self._dispatcher.is_receiving_stopped
        ):
            backoff_s = self.run_once()
            if backoff_s:
                stop.wait(backoff_s)

    def run_once(self) -> float:
        """One reserve-receive-submit round; returns seconds to back off (0 for none)."""
        self.last_tick_s = self._clock.monotonic()
        if self._gate.is_paused:
            self._gate.wait_resumed(0.5)
            return 0.0
        if self._is_acks_behind():
            return _ACKS_BEHIND_WAIT_S  # let the deletes catch up first
        granted = self._dispatcher.reserve(self.queue, self.queue.policy.max_messages)
        if granted == 0:
            return 0.0
        wait_s = self._gate.wait_time_s(self.queue.policy.wait_time_s, is_idle=self._is_idle)
        if wait_s is None:
            self._dispatcher.unreserve(self.queue, granted)
            return 0.2
        try:
            raw = self._receive(granted, wait_s)
        except Exception as exc:
            self._dispatcher.unreserve(self.queue, granted)
            return self._on_error(exc)
        self._failures = 0
        self._is_idle = not raw
        self._dispatcher.unreserve(self.queue, granted - len(raw))
        if raw:
            self._hand_over(raw)
        return 0.0

    def _is_acks_behind(self) -> bool:
        return (
            self._acks.pending_for(self.queue.url) >= MAX_PENDING_ACKS
            or self._acks.pending_total() >= MAX_PENDING_ACKS_TOTAL
        )

    def _receive(self, count: int, wait_s: int) -> list[dict[str, Any]]:
        policy = self.queue.policy
        kwargs: dict[str, Any] = {
            "QueueUrl": self.queue.url,
            "MaxNumberOfMessages": count,
            "WaitTimeSeconds": wait_s,
            "MessageSystemAttributeNames": ["All"],
            "MessageAttributeNames": list(policy.message_attribute_names),
        }
        if policy.is_visibility_configured:
            kwargs["VisibilityTimeout"] = policy.visibility_timeout_s
        if self.queue.info.is_fifo:
            kwargs["ReceiveRequestAttemptId"] = uuid.uuid4().hex
        response = self._sqs.receive_message(**kwargs)
        messages: list[dict[str, Any]] = list(response.get("Messages", []))  # type: ignore[arg-type]
        return messages

    def _hand_over(self, raw: list[dict[str, Any]]) -> None:
        now = self._clock.monotonic()
        visible_until = now + self.queue.policy.visibility_timeout_s
        deliveries = [
            Delivery(
                message=message_from_sqs(m, queue_url=self.queue.url, queue_name=self.queue.name),
                queue=self.queue,
                received_at_s=now,
                visible_until_s=visible_until,
            )
            for m in raw
        ]
        self._stats.count(self.queue.name, "received", len(deliveries))
        if not self._dispatcher.submit(self.queue, self._items(deliveries)):
            self._dispatcher.unreserve(self.queue, len(deliveries))
            self._acks.change_visibility(deliveries, 0, reason="release")

    def _items(self, deliveries: list[Delivery]) -> list[WorkItem]:
        if self.queue.is_batch:
            groups = frozenset(d.message.group_id for d in deliveries if d.message.group_id)
            return [WorkItem(self.queue, tuple(deliveries), groups)]
        return [
            WorkItem(
                self.queue, (d,), frozenset([d.message.group_id] if d.message.group_id else [])
            )
            for d in deliveries
        ]

    def _on_error(self, exc: Exception) -> float:
        if isinstance(exc, ReceiveFenced):
            return 0.2  # as when the gate refused before the call: wait for a renewal
        code = error_code(exc)
        if isinstance(exc, ClientError) and code in _QUEUE_GONE:
            logger.warning(
                "queue no longer exists; stopping its poller", extra={"queue": self.queue.name}
            )
            self.queue.is_gone = True
            self._on_gone(self.queue)
            return 0.0
        self._failures += 1
        backoff_s = min(_MAX_BACKOFF_S, 0.5 * 2 ** min(self._failures, 8))
        log = logger.warning if is_transient(exc) or self._failures < 3 else logger.error
        log(
            "receive failed; backing off",
            extra={
                "queue": self.queue.name,
                "error": describe_error(exc),
                "failures": self._failures,
                "backoff_s": backoff_s,
            },
        )
        return backoff_s
