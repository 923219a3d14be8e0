"""Deletes, visibility changes and visibility extension, batched per queue.

A receipt takes one decision (delete, retry or release), so those never race each other.
Batches go out on a few sender threads (whichever is due runs the extension round, one at
a time, before its flush); an extension may cross its message's delete on another sender,
which SQS answers with an entry error that changes nothing.

Retries are this module's, not botocore's (the acks client makes one attempt per call): a
failed call or entry goes back into its queue's list with a backoff, so one throttled
queue never holds up the batches of the others.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqsbalancerd.aws import THROTTLING_CODES, describe_error, error_code, is_transient
from sqsbalancerd.clock import Clock
from sqsbalancerd.engine.state import Delivery, DeliveryState
from sqsbalancerd.stats import Stats

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

logger = logging.getLogger(__name__)

BATCH_LIMIT = 10
# Threads sending batches (the first also extends): one thread, one call at a time, could
# not keep up with a fan-out's deletes, a batch per queue (1,000 queues: 1,000 calls).
SENDER_THREADS = 4
# Batches one thread takes per round; it wakes another sender if more are due.
BATCHES_PER_ROUND = 2
# Longest a sender that does not keep time sleeps before looking for work itself.
SPARE_WAIT_S = 1.0
# Backpressure on receiving: while this many operations wait to be sent for one queue (or
# for all: one thread sends them), its pollers wait (see Acknowledger.is_behind).
MAX_PENDING_PER_QUEUE = 2 * BATCH_LIMIT
MAX_PENDING_TOTAL = 10 * BATCH_LIMIT
# Attempts for any failure; transient ones (throttling, 5xx, network) go on past this while
# the receipt handle is still ours (see `_should_retry`).
MAX_ATTEMPTS = 5
MAX_BACKOFF_S = 5.0
# flush_all's first pause between rounds, doubling: 3 s in all, well inside Engine.stop's 10 s.
FLUSH_BACKOFF_S = 0.2
# A change this close to the end of a receipt's visibility (by our clock, which starts a
# little after SQS's) may arrive too late: treat the receipt as lapsed.
LAPSE_MARGIN_S = 0.5
# After a round of extensions failed, the next round comes this soon (doubling while they
# keep failing, up to the usual check interval), not one whole interval later.
EXTENSION_RETRY_S = 0.1
_HELD = frozenset({DeliveryState.QUEUED, DeliveryState.RUNNING})
# Receipt-handle errors that no retry can fix: the message will simply reappear.
_PERMANENT_CODES = frozenset(
    {
        "ReceiptHandleIsInvalid",
        "InvalidParameterValue",
        "MessageNotInflight",
        "InvalidReceiptHandle",
    }
)


@dataclass(slots=True, eq=False)
class PendingOp:
    delivery: Delivery
    visibility_timeout_s: int | None  # None: delete
    reason: str  # delete | retry | release | extend
    attempts: int = 0
    due_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Failure:
    code: str
    is_transient: bool


class Acknowledger:
    def __init__(
        self,
        sqs: SQSClient,
        *,
        stats: Stats,
        clock: Clock,
        linger_s: float = 0.1,
        on_settled: Callable[[str], None] | None = None,
    ) -> None:
        self._sqs = sqs
        self._stats = stats
        self._clock = clock
        self._linger_s = linger_s
        self._on_settled = on_settled
        # Entered as `self._lock` (the conditions share it; their __enter__ is Python-level).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # this thread's own wait
        # Pollers held back while acks are behind wait here; woken when the backlog drops
        # below a limit, not polled (a thousand pollers spinning starved this thread). Its
        # own lock: a thousand of them re-taking the senders' lock starved the senders.
        self._caught_up = threading.Condition()
        self._is_holding_back = True  # False once receiving stops: nobody waits any more
        self._listed = 0  # operations in the lists (kept as a count: summing is O(queues))
        self._in_flight_total = 0
        self._deletes: dict[str, list[PendingOp]] = defaultdict(list)
        self._changes: dict[str, list[PendingOp]] = defaultdict(list)
        # Taken for a call not yet answered: still pending for backpressure and draining.
        self._in_flight: dict[str, int] = defaultdict(int)
        self._extension_source: Callable[[float], list[tuple[Delivery, int]]] | None = None
        self._extension_every_s = 1.0
        self._next_extension_s = 0.0
        self._on_lapsed: Callable[[Delivery], None] | None = None
        self._on_extension_failed: Callable[[Delivery, float], None] | None = None
        self._failed_extension_rounds = 0
        self._is_extending = False  # one sender at a time runs an extension round
        # Senders not keeping time wait here (see _wait_for_work).
        self._spare = threading.Condition(self._lock)
        self._has_timekeeper = False
        self._timekeeper_until_s = 0.0  # when the timekeeper wakes unless woken
        self._has_extension_failed = False
        self._is_stopped = False
        self.last_tick_s = clock.monotonic()

    def set_lapse_handler(self, on_lapsed: Callable[[Delivery], None]) -> None:
        """Told of a held message whose extension came too late (it may be received again)."""
        self._on_lapsed = on_lapsed

    def set_extension_failure_handler(self, on_failed: Callable[[Delivery, float], None]) -> None:
        """Told `(delivery, now)` of each failed extension (it will be retried soon)."""
        self._on_extension_failed = on_failed

    def set_extension_source(
        self, source: Callable[[float], list[tuple[Delivery, int]]], *, every_s: float
    ) -> None:
        """`source(now)` lists (delivery, new timeout) pairs due for extension."""
        self._extension_source = source
        self._extension_every_s = every_s

    # -- producers ------------------------------------------------------------------------

    def delete(self, deliveries: Iterable[Delivery]) -> None:
        now = self._clock.monotonic()
        with self._lock:
            for delivery in deliveries:
                if not _decide(delivery, "delete"):
                    continue
                ops = self._deletes[delivery.queue.url]
                ops.append(PendingOp(delivery, None, "delete", due_s=now + self._linger_s))
                self._listed += 1
                # The first one starts the linger: wake the thread so it waits 0.1 s, not 1 s.
                if len(ops) >= BATCH_LIMIT:
                    self._wake_sender()
                elif len(ops) == 1:
                    self._wake_sender(now + self._linger_s)
        self._send_now_if_stopped()

    def change_visibility(
        self, deliveries: Iterable[Delivery], timeout_s: int, *, reason: str
    ) -> None:
        """`reason` extend keeps a message invisible; retry and release are its decision,
        taken once per receipt (a second one is ignored: SQS would unblock a FIFO group)."""
        now = self._clock.monotonic()
        with self._lock:
            for delivery in deliveries:
                if reason != "extend" and not _decide(delivery, reason):
                    continue
                op = PendingOp(delivery, max(0, min(43_200, timeout_s)), reason, due_s=now)
                self._changes[delivery.queue.url].append(op)
                self._listed += 1
            self._wake_sender()
        self._send_now_if_stopped()

    def pending_for(self, queue_url: str) -> int:
        with self._lock:
            return (
                len(self._deletes.get(queue_url, ()))
                + len(self._changes.get(queue_url, ()))
                + self._in_flight.get(queue_url, 0)
            )

    def pending_total(self) -> int:
        with self._lock:
            return self._listed + self._in_flight_total

    def is_behind(self, queue_url: str) -> bool:
        """Too many of this queue's (or everyone's) operations wait to be sent: receive no
        more until they are. Otherwise a slow or throttled delete path lets handled but
        undeleted messages outlive their visibility and come back, by the thousand."""
        with self._lock:
            return self._is_behind_locked(queue_url)

    def _is_behind_locked(self, queue_url: str) -> bool:
        if self._listed + self._in_flight_total >= MAX_PENDING_TOTAL:
            return True
        queue_pending = (
            len(self._deletes.get(queue_url, ()))
            + len(self._changes.get(queue_url, ()))
            + self._in_flight.get(queue_url, 0)
        )
        return queue_pending >= MAX_PENDING_PER_QUEUE

    def wait_caught_up(self, queue_url: str, timeout_s: float) -> bool:
        """Wait until `is_behind(queue_url)` is false (True) or the timeout (False)."""
        # The counts are read without the senders' lock: a moment stale is fine here.
        with self._caught_up:
            return self._caught_up.wait_for(
                lambda: not (self._is_holding_back and self._is_behind_locked(queue_url)),
                timeout=timeout_s,
            )

    def wake_held_back(self) -> None:
        """Receiving stops: held-back pollers return now, to look at their stop flags."""
        with self._caught_up:
            self._is_holding_back = False
            self._caught_up.notify_all()

    def retrying_deletes(self) -> list[Delivery]:
        """Messages whose delete failed and awaits a retry: still ours, so still extended.

        Safe to extend: extensions and deletes go out on this one thread, so an extension
        listed now is sent before the retried delete can succeed.
        """
        with self._lock:
            ops = [op for table_ops in self._deletes.values() for op in table_ops]
        return [op.delivery for op in ops if op.attempts and not op.delivery.is_expired]

    # -- the loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Flush as batches fill or linger out; on stop, flush everything and return."""
        while not stop.is_set():
            self.run_once(wait=True, max_batches=BATCHES_PER_ROUND)
        self.flush_all()
        self._is_stopped = True
        self.flush_all()  # anything added while the last flush ran

    def run_sender(self, stop: threading.Event) -> None:
        """Another sender beside `run` (no final flush: `run` does that)."""
        while not stop.is_set():
            self.run_once(wait=True, max_batches=BATCHES_PER_ROUND)

    def _send_now_if_stopped(self) -> None:
        # A poll that outlived the drain hands its messages back after this thread ended:
        # send them from the caller's thread instead of leaving them invisible.
        if self._is_stopped:
            self.flush_all(max_rounds=2)

    def run_once(
        self, *, wait: bool = False, force: bool = False, max_batches: int | None = None
    ) -> int:
        """One round; returns how many operations were sent."""
        self.last_tick_s = self._clock.monotonic()
        if wait:
            self._wait_for_work()
        sent = 0
        now = self._clock.monotonic()
        # Extensions first: a flush of many deletes must not let held messages reappear.
        if self._take_extension_round(now):
            try:
                sent += self._extend(now)
            finally:
                self._is_extending = False
        return sent + self._flush_due(force=force, max_batches=max_batches)

    def _wait_for_work(self) -> None:
        """One sender keeps time (waits for the next linger, backoff or extension round);
        the others sleep until work comes while it is away sending. All four waiting for
        the same deadline woke together at each one, and three found nothing to do (~18
        sender rounds per batch sent at 600 messages/s)."""
        with self._lock:
            if self._has_timekeeper:
                if self._wait_s() > 0:  # nothing left over for this one to send
                    self._spare.wait(SPARE_WAIT_S)
                return
            self._has_timekeeper = True
            wait_s = self._wait_s()
            self._timekeeper_until_s = self._clock.monotonic() + wait_s
            try:
                self._cond.wait(wait_s)
            finally:
                self._has_timekeeper = False

    def _wake_sender(self, due_s: float = 0.0) -> None:
        """Something new to send by `due_s` (the caller holds the lock): the timekeeper
        wakes if it would sleep past it; while it is away sending, a spare takes over."""
        if not self._has_timekeeper:
            self._spare.notify()
        elif due_s < self._timekeeper_until_s:
            self._cond.notify()

    def _take_extension_round(self, now: float) -> bool:
        """True for the one sender that runs this extension round."""
        with self._lock:
            if self._extension_source is None or self._is_extending:
                return False
            if now < self._next_extension_s:
                return False
            self._is_extending = True
            self._next_extension_s = now + self._extension_every_s
            return True

    def flush_all(self, *, max_rounds: int = MAX_ATTEMPTS) -> None:
        """Send everything now; retry failures after a short pause (bounded: this runs at
        shutdown), then give up what is left."""
        for round_ in range(max_rounds):
            if round_:
                with self._lock:  # a throttled call retried at once would be throttled again
                    self._cond.wait(FLUSH_BACKOFF_S * 2 ** (round_ - 1))
            self._flush_due(force=True)
            if self.pending_total() == 0:
                return
        self._give_up_all()

    def _wait_s(self) -> float:
        now = self._clock.monotonic()
        tables = (self._deletes, self._changes)
        if any(_ready_ops(ops, now, force=False) for t in tables for ops in t.values()):
            return 0.0
        # Retried operations sit behind their backoff anywhere in a list, not just first.
        dues = [op.due_s for t in tables for ops in t.values() for op in ops]
        nearest = min(dues, default=now + self._extension_every_s)
        if self._extension_source is not None:
            nearest = min(nearest, self._next_extension_s)
        return max(0.0, min(nearest - now, self._extension_every_s))

    def _flush_due(self, *, force: bool, max_batches: int | None = None) -> int:
        batches = [
            (kind, url, batch)
            for kind, table in (("change", self._changes), ("delete", self._deletes))
            for url, batch in self._take_due(table, force=force, max_batches=max_batches)
        ]
        if max_batches is not None and len(batches) >= max_batches:
            with self._lock:
                self._wake_sender()  # there may be more: another sender takes them
        # The receipt closest to the end of its visibility goes first.
        batches.sort(key=lambda b: min(op.delivery.visible_until_s for op in b[2]))
        for kind, url, batch in batches:
            self._send(kind, url, batch, taken=True)
        return sum(len(batch) for _, _, batch in batches)

    def _take_due(
        self, table: dict[str, list[PendingOp]], *, force: bool, max_batches: int | None = None
    ) -> list[tuple[str, list[PendingOp]]]:
        now = self._clock.monotonic()
        batches: list[tuple[str, list[PendingOp]]] = []
        with self._lock:
            for url, ops in list(table.items()):
                if max_batches is not None and len(batches) >= max_batches:
                    break
                ready = _ready_ops(ops, now, force=force)
                if not ready:
                    continue
                taken = {id(op) for op in ready}
                ops[:] = [op for op in ops if id(op) not in taken]
                if not ops:
                    del table[url]  # queues come and go: keep no empty list per URL
                self._in_flight[url] += len(ready)
                self._listed -= len(ready)
                self._in_flight_total += len(ready)
                for start in range(0, len(ready), BATCH_LIMIT):
                    batches.append((url, ready[start : start + BATCH_LIMIT]))
        return batches

    # -- sending --------------------------------------------------------------------------

    def _send(self, kind: str, url: str, batch: list[PendingOp], *, taken: bool = False) -> None:
        """One call, one attempt; failed operations go back into their list to retry later.

        `taken`: the batch came from the lists (counted in flight until it is answered).
        """
        sendable = batch if kind == "delete" else self._still_in_flight(batch)
        if not sendable:
            self._done_in_flight(url, batch, [], taken=taken)
            return
        sent_s = self._clock.monotonic()
        try:
            failed = self._call(kind, url, sendable)
        except Exception as exc:
            logger.warning(
                "batch call failed",
                extra={
                    "queue": batch[0].delivery.queue.name,
                    "action": kind,
                    "error": describe_error(exc),
                    "count": len(batch),
                },
            )
            failure = Failure(error_code(exc) or type(exc).__name__, is_transient(exc))
            failed = {str(i): failure for i in range(len(sendable))}
        retry = self._account(sendable, failed, sent_s=sent_s)
        self._done_in_flight(url, batch, retry, taken=taken, kind=kind)

    def _done_in_flight(
        self,
        url: str,
        batch: list[PendingOp],
        retry: list[PendingOp],
        *,
        taken: bool,
        kind: str = "change",
    ) -> None:
        table = self._deletes if kind == "delete" else self._changes
        wake = 0
        with self._lock:
            was_behind = self._is_behind_locked(url)
            # Back in the list before the in-flight count drops: never seen as not pending.
            if retry:
                table[url].extend(retry)
                self._listed += len(retry)
            if taken:
                self._in_flight[url] -= len(batch)
                self._in_flight_total -= len(batch)
                if not self._in_flight[url]:
                    del self._in_flight[url]
            if was_behind and not self._is_behind_locked(url):
                # As many as the backlog has room for, not every held-back poller (a
                # thousand woken per call starved the senders).
                pending = self._listed + self._in_flight_total
                wake = max(1, MAX_PENDING_TOTAL - pending)
        if wake:
            with self._caught_up:
                self._caught_up.notify(wake)
        self._notify_settled(batch)

    def _still_in_flight(self, batch: list[PendingOp]) -> list[PendingOp]:
        """Drop visibility changes SQS must not see: an extension of a message already
        decided or given up, and any change once the receipt's visibility has run out
        (SQS answers MessageNotInflight; moto applies it and unblocks a FIFO group)."""
        now = self._clock.monotonic()
        kept = []
        for op in batch:
            delivery = op.delivery
            if op.reason == "extend" and not may_extend(delivery):
                continue
            if now >= delivery.visible_until_s - LAPSE_MARGIN_S:
                self._lapsed(op)
                continue
            kept.append(op)
        return kept

    def _lapsed(self, op: PendingOp) -> None:
        delivery = op.delivery
        self._stats.count(delivery.queue.name, "lapsed")
        if op.reason == "extend":
            delivery.is_expired = True  # it may be received again: this copy's result is void
            delivery.decision = delivery.decision or "lapsed"
            if self._on_lapsed is not None:
                self._on_lapsed(delivery)
        # A release that comes too late changes nothing (the message is visible already).
        log = logger.debug if op.reason == "release" else logger.warning
        log(
            "visibility ran out before the change was sent; dropped",
            extra={
                "queue": delivery.queue.name,
                "message_id": delivery.message.message_id,
                "action": op.reason,
            },
        )

    def _call(self, kind: str, url: str, batch: list[PendingOp]) -> dict[str, Failure]:
        """Send one batch; returns {entry id: failure} for the entries that failed."""
        response: Any
        if kind == "delete":
            entries = [
                {"Id": str(i), "ReceiptHandle": op.delivery.message.receipt_handle}
                for i, op in enumerate(batch)
            ]
            response = self._sqs.delete_message_batch(QueueUrl=url, Entries=entries)  # type: ignore[arg-type]
        else:
            changes = [
                {
                    "Id": str(i),
                    "ReceiptHandle": op.delivery.message.receipt_handle,
                    "VisibilityTimeout": op.visibility_timeout_s or 0,
                }
                for i, op in enumerate(batch)
            ]
            response = self._sqs.change_message_visibility_batch(QueueUrl=url, Entries=changes)  # type: ignore[arg-type]
        return {f["Id"]: _entry_failure(f) for f in response.get("Failed", [])}

    def _account(
        self, batch: list[PendingOp], failed: dict[str, Failure], *, sent_s: float
    ) -> list[PendingOp]:
        """Count what succeeded or was given up; returns what to retry, due after a backoff."""
        retry: list[PendingOp] = []
        now = self._clock.monotonic()
        # Jittered (instances throttled together should not retry in lockstep), but once per
        # batch: what failed together is retried together, not split into smaller calls.
        jitter = random.uniform(0.5, 1.0)
        counts: dict[tuple[str, str], int] = {}  # one stats lock per batch, not per entry
        for index, op in enumerate(batch):
            failure = failed.get(str(index)) if failed else None
            if failure is None:
                self._count_success(op, sent_s, counts)
                continue
            op.attempts += 1
            if op.reason == "extend":
                self._extension_failed(op, failure.code, now)
                continue
            if not _should_retry(op, failure, now):
                self._count_failure(op, failure.code)
                continue
            op.due_s = now + min(MAX_BACKOFF_S, 0.2 * 2 ** min(op.attempts, 8)) * jitter
            retry.append(op)
            self._stats.count(op.delivery.queue.name, "ack_retried")
        if counts:
            self._stats.count_many(counts)
        return retry

    def _settled(self, op: PendingOp) -> None:
        if op.reason != "extend":
            op.delivery.is_settled = True
            op.delivery.queue.forget_delivery(op.delivery)

    def _count_success(
        self, op: PendingOp, sent_s: float, counts: dict[tuple[str, str], int]
    ) -> None:
        self._settled(op)
        queue = op.delivery.queue.name
        if op.reason == "delete":
            key = (queue, "deleted")
            counts[key] = counts.get(key, 0) + 1
        elif op.reason == "release":
            key = (queue, "released")
            counts[key] = counts.get(key, 0) + 1
        elif op.reason == "extend" and op.visibility_timeout_s is not None:
            # From when it was sent: SQS applied it somewhere between then and now.
            op.delivery.visible_until_s = sent_s + op.visibility_timeout_s

    def _count_failure(self, op: PendingOp, code: str) -> None:
        self._settled(op)
        queue = op.delivery.queue.name
        if op.reason == "delete":
            self._stats.count(queue, "delete_failed")
        logger.warning(
            "giving up on a message operation; the message will reappear",
            extra={
                "queue": queue,
                "message_id": op.delivery.message.message_id,
                "action": op.reason,
                "error": code or "unknown",
                "attempts": op.attempts,
            },
        )

    def _give_up_all(self) -> None:
        with self._lock:
            leftovers = [
                op for t in (self._deletes, self._changes) for ops in t.values() for op in ops
            ]
            self._deletes.clear()
            self._changes.clear()
            self._listed = 0
        self.wake_held_back()
        for op in leftovers:
            self._count_failure(op, "shutdown")

    def _notify_settled(self, batch: list[PendingOp]) -> None:
        if self._on_settled is None:
            return
        for name in {op.delivery.queue.name for op in batch}:
            self._on_settled(name)

    # -- extension ------------------------------------------------------------------------

    def _extend(self, now: float) -> int:
        assert self._extension_source is not None
        due = self._extension_source(now)
        by_queue: dict[str, list[PendingOp]] = defaultdict(list)
        for delivery, timeout_s in due:
            by_queue[delivery.queue.url].append(PendingOp(delivery, timeout_s, "extend"))
        self._has_extension_failed = False
        for url, ops in by_queue.items():
            for start in range(0, len(ops), BATCH_LIMIT):
                self._send("change", url, ops[start : start + BATCH_LIMIT])
        if self._has_extension_failed:
            # Retried early: a failed extension still due is listed again by the next round.
            self._failed_extension_rounds += 1
            retry_s = EXTENSION_RETRY_S * 2 ** min(self._failed_extension_rounds - 1, 8)
            self._next_extension_s = min(self._next_extension_s, now + retry_s)
        elif due:
            self._failed_extension_rounds = 0
        return len(due)

    def _extension_failed(self, op: PendingOp, code: str, now: float) -> None:
        self._has_extension_failed = True
        delivery = op.delivery
        logger.warning(
            "visibility extension failed; retrying soon",
            extra={
                "queue": delivery.queue.name,
                "message_id": delivery.message.message_id,
                "error": code or "unknown",
                "visible_for_s": round(delivery.visible_until_s - now, 1),
            },
        )
        if self._on_extension_failed is not None:
            self._on_extension_failed(delivery, now)


def extension_lead_s(visibility_timeout_s: float) -> float:
    """How long before its visibility runs out a held message is extended."""
    return max(2.0, min(visibility_timeout_s / 3, 10.0))


def _decide(delivery: Delivery, decision: str) -> bool:
    """Record the receipt's one decision; False when it already has one (or was given up)."""
    if delivery.decision is not None or (delivery.is_expired and decision != "release"):
        return False
    delivery.decision = decision
    return True


def may_extend(delivery: Delivery) -> bool:
    """Still ours to keep invisible: undecided and held, or decided delete (not yet done)."""
    if delivery.is_expired:
        return False
    if delivery.decision == "delete":
        return True
    return delivery.decision is None and delivery.state in _HELD


def _entry_failure(entry: Any) -> Failure:
    """A failed batch entry: SenderFault false (SQS's side) or throttled is worth retrying."""
    code = str(entry.get("Code", ""))
    return Failure(code, not entry.get("SenderFault", False) or code in THROTTLING_CODES)


def _should_retry(op: PendingOp, failure: Failure, now_s: float) -> bool:
    """Retry unless no retry can help: a rejected receipt handle, a persistent error after
    MAX_ATTEMPTS, or a transient one once the visibility timeout has lapsed (the message may
    have been received again since, under a new receipt handle) and MAX_ATTEMPTS are spent.
    (Extensions never get here: the next round lists them again, see _extension_failed.)"""
    if failure.code in _PERMANENT_CODES:
        return False
    if op.attempts < MAX_ATTEMPTS:
        return True
    return failure.is_transient and now_s < op.delivery.visible_until_s


def _ready_ops(ops: list[PendingOp], now: float, *, force: bool) -> list[PendingOp]:
    """What to send now: every due operation, its last batch topped up with lingering ones,
    and any further full batches of lingering ones.

    A delete lingers to fill its batch; once ten are waiting there is nothing to wait for,
    and once one is due the others ride in its call for free (sent before their own
    linger ends: at 50 ms handlers, batches averaged 1.8 deletes when each waited for its
    own). Retried operations keep their backoff, and never hold up newer ones behind them.
    """
    if force:
        return list(ops)
    ready = [op for op in ops if op.due_s <= now]
    lingering = [op for op in ops if op.due_s > now and op.attempts == 0]
    fill = -len(ready) % BATCH_LIMIT  # room left in the due ones' last batch
    fill = min(fill, len(lingering))
    fill += (len(lingering) - fill) // BATCH_LIMIT * BATCH_LIMIT
    if fill <= 0:
        return ready
    chosen = {id(op) for op in ready} | {id(op) for op in lingering[:fill]}
    return [op for op in ops if id(op) in chosen]
