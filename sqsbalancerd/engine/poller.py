"""One long-polling receiver per owned queue.

A poller asks the dispatcher for room before it receives, so it never takes messages
this process cannot start while it holds them; what a receive returns after receiving
stopped is released at once instead of waiting in memory for its visibility to run out.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from sqsbalancerd.engine.idle import IdlePacer
from sqsbalancerd.engine.state import Delivery, QueueRuntime, WorkItem, size_of
from sqsbalancerd.message import message_from_sqs
from sqsbalancerd.stats import Stats

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

logger = logging.getLogger(__name__)

_QUEUE_GONE = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
_MAX_BACKOFF_S = 30.0
# Longest a poller waits for a heartbeat renewal that is about to lengthen its budget.
RENEWAL_WAIT_S = 2.0
# Longest a held-back poller waits before looking at its stop flags again (the backlog
# draining wakes it; a thousand of them re-checking every 0.5 s cost 2,000 wake-ups/s).
ACKS_BEHIND_WAIT_S = 2.0
# Longest a poller waits for room before looking at its flags again: stopping, pausing and
# freed room wake it, so this only bounds a missed wake-up (1,000 waiting pollers
# re-checking every 0.5 s cost 2,000 wake-ups a second).
WAIT_FOR_ROOM_S = 2.0
# Longest a poller whose receive budget is spent waits for the renewal that restores it.
FENCED_WAIT_S = 2.0
# WaitTimeSeconds of a receive on a queue known to have work. A long poll asks every SQS
# server (a short one samples a few and may come back short or empty while messages wait),
# so a standard queue's receive that returns fewer than it asked for means the queue ran
# dry: its poller goes back to idle long polling without an empty receive to confirm it.
# One second bounds how long a receive of a queue that just ran dry keeps its claimed room.
BUSY_WAIT_S = 1
# Upper bound on how long a receive's answer takes to reach us after SQS hid its messages.
RECEIVE_LATENCY_MARGIN_S = 1.0


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

    def wait_renewed(self, timeout_s: float) -> None:
        with self._renewed:
            self._renewed.wait(timeout_s)

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
        is_extra: bool = False,
    ) -> None:
        self.queue = queue
        # An extra receiver of a hot queue: it ends once a receive is not full.
        self.is_extra = is_extra
        self.was_full = False
        self._sqs = sqs
        self._dispatcher = dispatcher
        self._acks = acks
        self._gate = gate
        self._stats = stats
        self._clock = clock
        self._on_gone = on_gone
        fence_receive_attempts(sqs, gate)
        self._failures = 0
        # The last receive returned nothing. An extra receiver joins only because the
        # queue's receives come back full: it starts busy. Started idle, with 200 owned
        # queues it asked for its part of the bound (one message) in a long poll, came
        # back not full and left at once, so a hot queue among idle ones kept two.
        self._is_idle = not is_extra
        # Spaces the long polls of a queue empty for a while (sqs.idle_latency; extras end).
        self.idle = IdlePacer(0.0 if is_extra else queue.policy.idle_latency_s)
        self.last_tick_s = clock.monotonic()

    def run(self, stop: threading.Event) -> None:
        while not (
            stop.is_set()
            or self.queue.is_stopping
            or self.queue.is_gone
            or self._dispatcher.is_receiving_stopped
        ):
            backoff_s = self.run_once()
            if self.is_extra and not self.was_full:
                return
            if backoff_s:
                stop.wait(backoff_s)

    def run_once(self) -> float:
        """One reserve-receive-submit round; returns seconds to back off (0 for none)."""
        self.last_tick_s = self._clock.monotonic()
        if idle_wait_s := self.idle.wait_s(self.last_tick_s):
            return idle_wait_s
        if self._gate.is_paused:
            self._gate.wait_resumed(0.5)
            return 0.0
        if self._acks.is_behind(self.queue.url):  # let the deletes catch up first
            self._acks.wait_caught_up(self.queue.url, ACKS_BEHIND_WAIT_S)
            return 0.0
        is_idle = self._is_idle
        claims = not is_idle
        granted = self._dispatcher.reserve(
            self.queue, self._want(is_idle), timeout_s=WAIT_FOR_ROOM_S, claims_total=claims
        )
        if granted == 0:
            self.was_full = False  # no room: another receiver would not help
            return 0.0
        # A receive that claims room from the total must return soon: one that long-
        # polled a queue just run dry held its ten for WaitTimeSeconds (20 s), and a Zipf
        # spread's small queues, running dry together, held the whole bound (30 msgs/s).
        # It waits BUSY_WAIT_S at most; once the queue ran dry, its next poll waits as usual.
        wanted_s = self.queue.policy.wait_time_s
        if not is_idle:
            wanted_s = min(wanted_s, BUSY_WAIT_S)
        wait_s = self._gate.wait_time_s(wanted_s, is_idle=is_idle)
        # The gate may have waited for a renewal, or paused while we waited for room.
        if wait_s is None or self._is_stopping() or self._gate.is_paused:
            self._dispatcher.end_poll(self.queue, granted, received=0, claims_total=claims)
            if wait_s is None and not self._is_stopping():
                # The budget is spent: only a renewal restores it (10,000 pollers retrying
                # every 0.2 s instead overloaded the host while fenced).
                self._gate.wait_renewed(FENCED_WAIT_S)
                return 0.0
            return 0.2
        started_s = self._clock.monotonic()
        try:
            raw = self._receive(granted, wait_s)
        except Exception as exc:
            self._dispatcher.end_poll(self.queue, granted, received=0, claims_total=claims)
            self.was_full = False
            return self._on_error(exc)
        self._failures = 0
        self._is_idle = self._ran_dry(len(raw), granted)
        self.was_full = len(raw) >= self.queue.policy.max_messages
        self._stats.note_receive(self.queue.name, is_full=self.was_full)
        if raw:
            self._hand_over_safely(raw, started_s)
        # After the hand-over: the room stays claimed until the messages count as held.
        self._dispatcher.end_poll(self.queue, granted, received=len(raw), claims_total=claims)
        now_s = self._clock.monotonic()
        is_holding = self.queue.held > 0 or self.queue.has_exhausted(now_s)
        return self.idle.after_receive(
            len(raw), started_s=started_s, now_s=now_s, is_holding=is_holding
        )

    def _ran_dry(self, received: int, asked: int) -> bool:
        """Whether the next receive should be an idle long poll. A short answer on a FIFO
        queue does not say it ran dry: the groups of messages in flight are held back."""
        return received == 0 or (received < asked and not self.queue.info.is_fifo)

    def _want(self, is_idle: bool) -> int:
        # While a FIFO message waits to be redriven, receive one at a time so that its
        # group-mates are not received (and counted) along with it each time it bounces.
        if self.queue.has_exhausted(self._clock.monotonic()):
            return 1
        want = self.queue.policy.max_messages
        return self._dispatcher.poll_size(want) if is_idle else want

    def _hand_over_safely(self, raw: list[dict[str, Any]], started_s: float) -> None:
        """A message we cannot queue must not keep its reserved room (the queue would stall
        for good) nor stay invisible: release what was received."""
        try:
            self._hand_over(raw, started_s)
        except Exception:
            logger.exception(
                "could not queue received messages; releasing them",
                extra={"queue": self.queue.name, "count": len(raw)},
            )
            self._dispatcher.unreserve(self.queue, len(raw))
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                for i, m in enumerate(raw)
                if "ReceiptHandle" in m
            ]
            with contextlib.suppress(Exception):
                self._sqs.change_message_visibility_batch(QueueUrl=self.queue.url, Entries=entries)  # type: ignore[arg-type]

    def _is_stopping(self) -> bool:
        return self.queue.is_stopping or self.queue.is_gone or self._dispatcher.is_receiving_stopped

    def _receive(self, count: int, wait_s: int) -> list[dict[str, Any]]:
        policy = self.queue.policy
        kwargs: dict[str, Any] = {
            "QueueUrl": self.queue.url,
            "MaxNumberOfMessages": count,
            "WaitTimeSeconds": wait_s,
            "MessageSystemAttributeNames": ["All"],
            "MessageAttributeNames": list(policy.message_attribute_names),
            # Always: the timeout the engine counts with is then the one SQS applies, even
            # after someone changes the queue's default.
            "VisibilityTimeout": policy.visibility_timeout_s,
        }
        if self.queue.info.is_fifo:
            kwargs["ReceiveRequestAttemptId"] = uuid.uuid4().hex
        response = self._sqs.receive_message(**kwargs)
        messages: list[dict[str, Any]] = list(response.get("Messages", []))  # type: ignore[arg-type]
        return messages

    def _hand_over(self, raw: list[dict[str, Any]], started_s: float) -> None:
        now = self._clock.monotonic()
        # SQS started the visibility timeout before the answer reached us: count from a
        # little earlier (a loaded process or network can take a while to deliver it).
        taken_s = now - min(now - started_s, RECEIVE_LATENCY_MARGIN_S)
        visible_until = taken_s + self.queue.policy.visibility_timeout_s
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
        deliveries = self._bounce_exhausted(self._without_duplicates(deliveries), now)
        if not deliveries:
            return
        refused = self._dispatcher.submit_bounded(self.queue, self._items(deliveries))
        if refused:  # receiving stopped, or past the global bounds: back at once
            self._dispatcher.unreserve(self.queue, len(refused))
            self._acks.change_visibility(refused, 0, reason="release")

    def _without_duplicates(self, deliveries: list[Delivery]) -> list[Delivery]:
        """A message received again while still ours (its visibility ran out while held, or
        before its delete went out) is not run twice: the held copy takes the new receipt,
        the newest, which is the one SQS accepts for its delete or visibility change."""
        with self.queue.receive_lock:
            fresh = self._match_known(deliveries)
        if len(fresh) < len(deliveries):
            self._dispatcher.unreserve(self.queue, len(deliveries) - len(fresh))
        return fresh

    def _match_known(self, deliveries: list[Delivery]) -> list[Delivery]:
        known = self.queue.by_message_id
        if len(known) > 4 * (self.queue.held + BATCH_LIMIT):
            for key, delivery in list(known.items()):
                if not delivery.is_still_ours():
                    known.pop(key, None)
        fresh = []
        for delivery in deliveries:
            held = known.get(delivery.message.message_id)
            if held is not None and held.is_still_ours():
                _take_newer_receipt(held, delivery)
                self._stats.count(self.queue.name, "duplicates")
                continue
            known[delivery.message.message_id] = delivery
            fresh.append(delivery)
        return fresh

    def _bounce_exhausted(self, deliveries: list[Delivery], now: float) -> list[Delivery]:
        """A FIFO message that used up its attempts goes straight back, unrun, until the
        redrive policy moves it to the dead-letter queue."""
        if not self.queue.exhausted:
            return deliveries
        bounced = [d for d in deliveries if self.queue.is_exhausted(d.message.message_id, now)]
        if not bounced:
            return deliveries
        for delivery in bounced:
            self.queue.mark_exhausted(delivery.message.message_id, now)
        self._dispatcher.unreserve(self.queue, len(bounced))
        self._acks.change_visibility(bounced, 0, reason="release")
        return [d for d in deliveries if d not in bounced]

    def _items(self, deliveries: list[Delivery]) -> list[WorkItem]:
        if self.queue.is_batch:
            groups = frozenset(d.message.group_id for d in deliveries if d.message.group_id)
            size = sum(size_of(d) for d in deliveries)
            return [WorkItem(self.queue, tuple(deliveries), groups, size_bytes=size)]
        return [
            WorkItem(
                self.queue,
                (d,),
                frozenset([d.message.group_id]) if d.message.group_id else _NO_GROUPS,
                size_bytes=size_of(d),
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


_NO_GROUPS: frozenset[str] = frozenset()


def _take_newer_receipt(held: Delivery, newer: Delivery) -> None:
    held.message = dataclasses.replace(
        held.message,
        receipt_handle=newer.message.receipt_handle,
        receive_count=newer.message.receive_count,
        attempt=max(held.message.attempt, newer.message.receive_count),
    )
    held.visible_until_s = newer.visible_until_s
    if held.decision == "lapsed":  # SQS handed it to us again: it is held once more
        held.decision = None
        held.is_expired = False
