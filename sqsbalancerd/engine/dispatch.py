"""The bounded work queue between pollers and workers.

It decides three things under one lock: how many messages a poller may receive (so
nothing is received that cannot be started while this process still holds it), which
queued item a free worker runs next (round-robin across queues, a receive's worth a turn,
honouring `max_concurrency`, `max_rate` and FIFO groups), and what is released on drain.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from sqsbalancerd.clock import Clock
from sqsbalancerd.engine.state import Delivery, DeliveryState, QueueRuntime, WorkItem

# Longest a blocked caller sleeps before re-checking its stop flag.
_RECHECK_S = 0.5
# A poller between two reserve calls is back within microseconds; one away longer (held
# back by the acks, receiving, stopped) loses its place in line instead of holding it up:
# at the head of the line it kept freed room from everyone behind it.
_STALE_WAITER_S = 0.1


@dataclass(slots=True, eq=False)
class _Waiter:
    queue: QueueRuntime
    seen_s: float
    want: int
    cond: threading.Condition
    waiting: int = 0  # callers blocked on `cond` now (several receivers share a queue's)


# A queue counts as active for its share while it holds messages or received some this
# recently; idle queues (one long poll each, nothing held) leave their share to the others.
_ACTIVE_FOR_S = 2.0
_ACTIVE_CACHE_S = 0.1


class Dispatcher:
    def __init__(
        self,
        *,
        capacity: int,
        clock: Clock,
        max_queued: int | None = None,
        max_held_bytes: int | None = None,
    ) -> None:
        self._capacity = capacity  # messages held at once: pool_size + queue_size
        self._clock = clock
        # Received but not started, across all queues; beyond it a receive's excess is
        # handed back at once (a fan-out to many idle long polls would exceed it otherwise).
        self._max_queued = max_queued if max_queued is not None else capacity
        self._max_held_bytes = max_held_bytes
        # Entered as `self._lock`, not through the conditions that share it: a Condition's
        # __enter__/__exit__ are Python-level calls, and this lock is taken ~6 times a message.
        self._lock = threading.Lock()
        # Targeted waking: workers wait on one condition, each queue's pollers on their own.
        self._cond = threading.Condition(self._lock)  # workers wait here
        self._idle = threading.Condition(self._lock)  # the drain waits here
        self._held_total = 0
        # Room claimed from the total by receives expected to return at once (not idle
        # long polls): a thousand pollers woken by the same free room must not all get it.
        self._polling_total = 0
        self._held_bytes = 0
        self._running_messages = 0
        self._active_count = 1
        self._active_at_s = -1.0
        self._ready: OrderedDict[str, QueueRuntime] = OrderedDict()  # queues with queued items
        self._queues: dict[str, QueueRuntime] = {}
        self._is_receiving_stopped = False
        self._running: set[WorkItem] = set()
        # The queue whose turn it is in `_pick`, and how many messages it started in it.
        self._turn_queue: str | None = None
        self._turn_started = 0
        # Pollers waiting for total room, in arrival order (see _is_next_in_line).
        self._waiting: dict[str, _Waiter] = {}

    @property
    def is_receiving_stopped(self) -> bool:
        return self._is_receiving_stopped

    # -- queues ---------------------------------------------------------------------------

    def add_queue(self, queue: QueueRuntime) -> None:
        with self._lock:
            self._queues[queue.name] = queue

    def remove_queue(self, queue: QueueRuntime) -> None:
        with self._lock:
            if self._queues.get(queue.name) is queue:
                del self._queues[queue.name]
            self._ready.pop(queue.name, None)
            self._waiting.pop(queue.name, None)

    def _per_queue_cap(self, queue: QueueRuntime) -> int:
        # Max-min fair and work-conserving: the bound is shared by the queues that have work,
        # never less than one full receive each.
        return max(queue.policy.max_messages, math.ceil(self._capacity / self._active_queues()))

    def _active_queues(self) -> int:
        now = self._clock.monotonic()
        if now - self._active_at_s >= _ACTIVE_CACHE_S:
            self._active_at_s = now
            self._active_count = max(
                1,
                sum(
                    1
                    for q in self._queues.values()
                    if q.held > q.polling or now - q.last_received_s < _ACTIVE_FOR_S
                ),
            )
        return self._active_count

    # -- pollers --------------------------------------------------------------------------

    def reserve(
        self,
        queue: QueueRuntime,
        want: int,
        *,
        timeout_s: float = _RECHECK_S,
        claims_total: bool = False,
    ) -> int:
        """Claim room for up to `want` messages of `queue`; 0 if none came within timeout.

        A long poll of a queue that had nothing last time claims only the queue's own share
        while in flight (idle long polls on many queues must not lock each other out of the
        bound). A receive expected to return at once (`claims_total`) also claims from the
        total until its poll ends, so room freed once is granted once, not to every waiter
        it wakes. Pass the same to `end_poll`.
        """
        deadline = self._clock.monotonic() + timeout_s
        with self._lock:
            while True:
                if self._is_receiving_stopped or queue.is_stopping:
                    self._waiting.pop(queue.name, None)
                    return 0
                now = self._clock.monotonic()
                room = self._grantable(queue, want)
                if room and self._is_next_in_line(queue, now):
                    self._waiting.pop(queue.name, None)
                    queue.held += room
                    queue.polling += room
                    if claims_total:
                        self._polling_total += room
                    self._wake_pollers()  # room may be left for the next in line
                    return room
                waiter = self._wait_in_line(queue, now, want)
                remaining = deadline - now
                if remaining <= 0:
                    return 0  # it keeps its place in line for its next call
                waiter.waiting += 1
                try:
                    waiter.cond.wait(remaining)
                finally:
                    waiter.waiting -= 1

    def _grantable(self, queue: QueueRuntime, want: int) -> int:
        """What a reserve may claim now; 0 while not enough is free.

        A receive of a few costs a whole request: where a bound holds two batches or more,
        the messages already held keep workers busy while we wait for room for a full one
        (requests/message stays at 0.1 receives, not 0.17).
        """
        queue_cap = self._room_cap(queue)
        queue_room = queue_cap - queue.held
        total_room = self._total_room()
        enough_total = _smallest_batch(self._total_bound(), want)
        if total_room < enough_total or queue_room < _smallest_batch(queue_cap, want):
            return 0
        return max(0, min(want, total_room, queue_room))

    def _room_cap(self, queue: QueueRuntime) -> int:
        """The most `queue` may hold now. Its fair share binds only while another queue
        waits for room: with nobody else asking, it may use all of it (work-conserving).
        In a Zipf spread's tail, drained queues still counted as active for a while and held
        the hot queue to 10 messages in hand while 24 of 50 workers sat idle.

        Read-only on the line: a waiter just woken is stale by its own entry's age, and
        purging it here (in `_grantable`, before `_is_next_in_line` finds its place) sent
        every woken waiter to the back of the line, behind the others it had woken."""
        now = self._clock.monotonic()
        for name, waiter in self._waiting.items():
            if name != queue.name and self._is_in_line(waiter, now):
                return self._per_queue_cap(queue)
        return self._capacity

    def has_room_for(self, queue: QueueRuntime, count: int) -> bool:
        """Whether another receive of `count` could be granted now (for adding receivers)."""
        with self._lock:
            return min(self._total_room(), self._room_cap(queue) - queue.held) >= count

    def poll_size(self, want: int) -> int:
        """What an idle long poll should ask for: its part of the bound were every owned
        queue's poll to return at once (a fan-out), at least one; the receives that follow,
        on queues known to have work, ask for full batches. Asking for ten each, a fan-out
        to 1,000 idle queues received 10,000 messages to keep 110 and release the rest."""
        with self._lock:
            return min(want, max(1, self._total_bound() // max(1, len(self._queues))))

    def _total_bound(self) -> int:
        return min(self._capacity, self._max_queued + BATCH_SLACK)

    def _total_room(self) -> int:
        not_started = self._held_total - self._running_messages + self._polling_total
        held = self._held_total + self._polling_total
        return min(self._capacity - held, self._max_queued + BATCH_SLACK - not_started)

    def _wait_in_line(self, queue: QueueRuntime, now: float, want: int) -> _Waiter:
        waiter = self._waiting.get(queue.name)
        if waiter is None:
            waiter = _Waiter(queue, seen_s=now, want=want, cond=threading.Condition(self._lock))
            self._waiting[queue.name] = waiter
        waiter.seen_s = now
        waiter.want = want
        return waiter

    def _is_live(self, waiter: _Waiter, now: float) -> bool:
        return waiter.waiting > 0 or now - waiter.seen_s <= _STALE_WAITER_S

    def _wake_pollers(self) -> None:
        """Room was freed: wake the first waiting queue that can use it now (it wakes the
        next if room is left), not every poller of every queue, nor one that would only
        find too little and wait again."""
        if not self._waiting or self._total_room() <= 0:
            return
        head = self._head_of_line(self._clock.monotonic())
        # Only the first in line may take the room (see _is_next_in_line). A head that is not
        # blocked in reserve (away receiving, between two calls) has nobody to wake: this
        # runs on every finish, and the check and the empty notify were most of its cost.
        if head is not None and head.waiting and self._grantable(head.queue, head.want):
            head.cond.notify_all()

    def _head_of_line(self, now: float) -> _Waiter | None:
        """The first waiter that could use room now; drops those that stopped asking on
        the way (so the line stays short: a thousand stale entries made this O(queues))."""
        stale: list[str] = []
        head = None
        for name, waiter in self._waiting.items():
            if not self._is_live(waiter, now):
                stale.append(name)
            elif self._is_in_line(waiter, now):
                head = waiter
                break
        for name in stale:
            del self._waiting[name]
        return head

    def _is_in_line(self, waiter: _Waiter, now: float) -> bool:
        """A waiter that could use room now: still asking, not stopping, its share free."""
        other = waiter.queue
        other_cap = self._per_queue_cap(other)
        return (
            self._is_live(waiter, now)
            and not other.is_stopping
            and other_cap - other.held >= _smallest_batch(other_cap, waiter.want)
        )

    def _is_next_in_line(self, queue: QueueRuntime, now: float) -> bool:
        """When the total room is contended, queues get it in the order they started waiting.

        Without this, a poller whose empty long poll just ended returns its reservation and at
        once takes it back (it still holds the GIL), and a queue that found no room can starve
        for as long as others keep polling. A waiter that cannot use room now (its own share
        has less free than the grant it waits for, it is stopping) or that stopped asking (its
        poller ended or is paused) does not hold up the line.
        """
        stale: list[str] = []
        is_next = True
        for name, waiter in self._waiting.items():
            if name == queue.name:
                break
            if not self._is_live(waiter, now):
                stale.append(name)
            elif self._is_in_line(waiter, now):
                is_next = False
                break
        for name in stale:  # the line stays short: stale entries made this O(queues)
            del self._waiting[name]
        return is_next

    def end_poll(
        self, queue: QueueRuntime, granted: int, *, received: int, claims_total: bool = False
    ) -> None:
        """The poll that reserved `granted` ended with `received` messages: the unused room
        goes back, and the queue counts as active for its share while it gets messages."""
        with self._lock:
            queue.polling -= granted
            if claims_total:
                self._polling_total -= granted
            queue.held -= granted - received
            if received:
                if self._clock.monotonic() - queue.last_received_s >= _ACTIVE_FOR_S:
                    self._active_at_s = -1.0  # it just became active: shares change
                queue.last_received_s = self._clock.monotonic()
            self._wake_pollers()

    def unreserve(self, queue: QueueRuntime, count: int) -> None:
        if count <= 0:
            return
        with self._lock:
            queue.held -= count
            self._wake_pollers()

    def submit(self, queue: QueueRuntime, items: Iterable[WorkItem]) -> bool:
        """Queue received items; False (nothing queued) once receiving stopped for `queue`."""
        listed = list(items)
        rejected = self.submit_bounded(queue, listed)
        return len(rejected) < sum(len(i.deliveries) for i in listed) or not listed

    def submit_bounded(self, queue: QueueRuntime, items: list[WorkItem]) -> list[Delivery]:
        """Queue what fits the global bounds (messages not started, bytes held); returns the
        deliveries that did not fit (all of them once receiving stopped), for release. What
        is refused is a suffix, so a FIFO group keeps its order."""
        with self._lock:
            if self._is_receiving_stopped or queue.is_stopping:
                return [d for item in items for d in item.deliveries]
            accepted = 0
            for index, item in enumerate(items):
                if not self._fits(item):
                    rejected = items[index:]
                    break
                queue.queued.append(item)
                self._held_total += len(item.deliveries)
                self._held_bytes += item.size_bytes
                accepted += 1
            else:
                rejected = []
            if queue.queued:
                self._ready[queue.name] = queue
            self._cond.notify(accepted)
            return [d for item in rejected for d in item.deliveries]

    def _fits(self, item: WorkItem) -> bool:
        queued = self._held_total - self._running_messages
        if queued + len(item.deliveries) > self._max_queued + BATCH_SLACK:
            return False
        if self._max_held_bytes is None or self._held_bytes == 0:
            return True  # one message always fits, whatever its size
        return self._held_bytes + item.size_bytes <= self._max_held_bytes

    # -- workers --------------------------------------------------------------------------

    def take(self, *, timeout_s: float = _RECHECK_S) -> WorkItem | None:
        """The next runnable item, fairly across queues; None when nothing came in time."""
        deadline = self._clock.monotonic() + timeout_s
        with self._lock:
            while True:
                item, wait_s = self._pick()
                if item is not None:
                    return item
                remaining = deadline - self._clock.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(min(remaining, wait_s, _RECHECK_S))

    def _pick(self) -> tuple[WorkItem | None, float]:
        """Round-robin across queues, a turn of up to `TURN_MESSAGES` each: a receive's
        messages start together, so they finish together and their deletes share a batch
        (one message per queue in turn, 4 queues of 50 ms handlers averaged 1.8 deletes per
        DeleteMessageBatch). A queue waits at most one turn of each other queue."""
        wait_s = _RECHECK_S
        for _ in range(len(self._ready)):
            name, queue = self._ready.popitem(last=False)
            item, queue_wait_s = self._pick_from(queue)
            if item is not None:
                self._start(item)
                if queue.queued:
                    self._ready[name] = queue
                    if self._takes_turn(name, len(item.deliveries)):
                        self._ready.move_to_end(name, last=False)  # its turn goes on
                elif name == self._turn_queue:
                    self._turn_queue = None  # emptied: its next items start a new turn
                return item, 0.0
            if queue.queued:
                self._ready[name] = queue  # to the back: the next take starts elsewhere
            wait_s = min(wait_s, queue_wait_s)
        return None, wait_s

    def _takes_turn(self, name: str, started: int) -> bool:
        """Count `started` messages to `name`'s turn; True while its turn lasts."""
        if name != self._turn_queue:
            self._turn_queue, self._turn_started = name, 0
        self._turn_started += started
        if self._turn_started < TURN_MESSAGES:
            return True
        self._turn_queue = None
        return False

    def _pick_from(self, queue: QueueRuntime) -> tuple[WorkItem | None, float]:
        policy = queue.policy
        if policy.max_concurrency is not None and queue.running_items >= policy.max_concurrency:
            return None, _RECHECK_S
        now = self._clock.monotonic()
        if queue.rate is None and queue.queued:
            head = queue.queued[0]
            if not head.groups and head.not_before_s <= now:
                # The usual case (no FIFO group, no backoff, no rate): the first item runs.
                queue.queued.popleft()
                return head, 0.0
        blocked_groups: set[str] = set(queue.running_groups)
        wait_s = _RECHECK_S
        for index, item in enumerate(queue.queued):
            if item.groups & blocked_groups:
                blocked_groups |= item.groups  # later messages of a group wait their turn
                continue
            if item.not_before_s > now:  # an in-process retry waiting out its backoff
                blocked_groups |= item.groups
                wait_s = min(wait_s, item.not_before_s - now)
                continue
            if queue.rate is not None:
                rate_wait_s = queue.rate.wait_s(len(item.deliveries), now)
                if rate_wait_s > 0:
                    return None, min(wait_s, rate_wait_s)
                queue.rate.take(len(item.deliveries), now)
            del queue.queued[index]
            return item, 0.0
        return None, wait_s

    def _start(self, item: WorkItem) -> None:
        queue = item.queue
        queue.running_items += 1
        queue.running_groups |= item.groups
        item.started_at_s = self._clock.monotonic()
        timeout_s = queue.policy.handler_timeout_s
        item.deadline_s = item.started_at_s + timeout_s if timeout_s is not None else None
        for delivery in item.deliveries:
            delivery.state = DeliveryState.RUNNING
        self._running.add(item)
        self._running_messages += len(item.deliveries)

    def finish(self, item: WorkItem) -> None:
        """The handler returned (or was abandoned): its messages no longer hold a slot."""
        with self._lock:
            queue = item.queue
            self._running.discard(item)
            queue.running_items -= 1
            queue.running_groups -= item.groups
            count = len(item.deliveries)
            queue.held -= count
            self._held_total -= count
            self._held_bytes -= item.size_bytes
            self._running_messages -= count
            if queue.held == queue.polling:
                self._active_at_s = -1.0  # it may have gone idle: shares change
            if queue.queued:
                self._ready[queue.name] = queue
                if item.groups or queue.policy.max_concurrency is not None:
                    # A group or a concurrency slot is free now: items it held back may
                    # run. Otherwise nothing became runnable that was not before, and the
                    # finishing worker takes the next item itself: a wake-up here woke a
                    # second worker per message for nothing (0 ms handlers).
                    self._cond.notify()
            if not self._running:
                self._idle.notify_all()
            self._wake_pollers()

    def claim_timeout(self, item: WorkItem) -> bool:
        """True the first time only: a blocked async call is seen past its deadline by the
        watchdog, then raises its own timeout once the loop runs again (one count, not two)."""
        with self._lock:
            if item.is_timeout_counted:
                return False
            item.is_timeout_counted = True
            return True

    def requeue(self, item: WorkItem) -> bool:
        """Queue an in-process retry ahead of its group-mates; False once the queue is being
        released (the caller hands the messages back to SQS instead)."""
        with self._lock:
            queue = item.queue
            if self._is_receiving_stopped or queue.is_stopping:
                return False
            for delivery in item.deliveries:
                delivery.state = DeliveryState.QUEUED
            queue.queued.appendleft(item)
            count = len(item.deliveries)
            queue.held += count
            self._held_total += count
            self._held_bytes += item.size_bytes
            self._ready[queue.name] = queue
            self._cond.notify()
            return True

    def has_queued_retry(self, queue: QueueRuntime, group: str) -> bool:
        with self._lock:
            return any(i.not_before_s and group in i.groups for i in queue.queued)

    def settle(self, deliveries: Iterable[Delivery], state: DeliveryState) -> list[Delivery]:
        """Mark deliveries finished; returns those whose result still counts (not expired)."""
        with self._lock:
            kept = []
            for delivery in deliveries:
                if delivery.is_expired:
                    continue
                delivery.state = state
                kept.append(delivery)
            return kept

    # -- releasing ------------------------------------------------------------------------

    def stop_receiving(self) -> list[Delivery]:
        """Refuse further receives and hand back everything queued but not started."""
        with self._lock:
            self._is_receiving_stopped = True
            released = []
            for queue in self._queues.values():
                released.extend(self._drop_queued(queue))
            self._wake_everyone()
            return released

    def stop_queue(self, queue: QueueRuntime) -> list[Delivery]:
        """The queue is no longer ours: no new receives, queued items handed back."""
        with self._lock:
            queue.is_stopping = True
            released = self._drop_queued(queue)
            self._wake_everyone()
            return released

    def _wake_everyone(self) -> None:
        self._cond.notify_all()
        for waiter in self._waiting.values():
            waiter.cond.notify_all()

    def drop_group(self, queue: QueueRuntime, group: str) -> list[Delivery]:
        """A FIFO message failed: its group's later messages must not run before it."""
        with self._lock:
            keep = [item for item in queue.queued if group not in item.groups]
            dropped = [item for item in queue.queued if group in item.groups]
            queue.queued.clear()
            queue.queued.extend(keep)
            if not keep:
                self._ready.pop(queue.name, None)
            return self._release_items(queue, dropped)

    def drop_expired(self, deliveries: Iterable[Delivery]) -> list[Delivery]:
        """Drop queued (not started) messages, e.g. past max_extension (they reappear on
        their own); returns every delivery of the items dropped."""
        dropped: list[Delivery] = []
        with self._lock:
            for delivery in deliveries:
                queue = delivery.queue
                for item in list(queue.queued):
                    if delivery in item.deliveries:
                        queue.queued.remove(item)
                        dropped += self._release_items(queue, [item])
                if not queue.queued:
                    self._ready.pop(queue.name, None)
            self._cond.notify_all()
        return dropped

    def _drop_queued(self, queue: QueueRuntime) -> list[Delivery]:
        items = list(queue.queued)
        queue.queued.clear()
        self._ready.pop(queue.name, None)
        return self._release_items(queue, items)

    def _release_items(self, queue: QueueRuntime, items: list[WorkItem]) -> list[Delivery]:
        deliveries = [d for item in items for d in item.deliveries]
        for delivery in deliveries:
            delivery.state = DeliveryState.RELEASED
        queue.held -= len(deliveries)
        self._held_total -= len(deliveries)
        self._held_bytes -= sum(item.size_bytes for item in items)
        self._wake_pollers()
        return deliveries

    # -- views ----------------------------------------------------------------------------

    def held_deliveries(self) -> list[Delivery]:
        """Everything whose visibility this process must keep extending."""
        with self._lock:
            queued = [d for q in self._queues.values() for i in q.queued for d in i.deliveries]
            running = [d for item in self._running for d in item.deliveries]
        return [d for d in queued + running if d.state in _HELD_STATES and not d.is_expired]

    def running_items(self) -> list[WorkItem]:
        with self._lock:
            return list(self._running)

    def is_queue_idle(self, queue: QueueRuntime) -> bool:
        with self._lock:
            return queue.held == 0 and not queue.queued

    def wait_until_idle(self, deadline_s: float, *, abort: threading.Event | None = None) -> bool:
        """Wait until no handler runs (True), or the deadline or `abort` comes (False)."""
        with self._lock:
            while self._running:
                remaining = deadline_s - self._clock.monotonic()
                if remaining <= 0 or (abort is not None and abort.is_set()):
                    return False
                self._idle.wait(min(remaining, 0.1))
            return True

    def held_bytes(self) -> int:
        """Bytes of the messages held (queued or running), as the byte budget counts them."""
        with self._lock:
            return self._held_bytes

    def depth(self) -> int:
        with self._lock:
            return sum(len(i.deliveries) for q in self._queues.values() for i in q.queued)

    def counts_by_queue(self, queues: Iterable[QueueRuntime]) -> dict[str, tuple[int, int]]:
        """(running messages, queued messages) by queue name, in one pass under the lock: a
        scrape asking queue by queue scanned every running item once per owned queue, while
        the pollers and workers waited for the lock."""
        listed = list(queues)
        with self._lock:
            running: dict[int, int] = {}
            for item in self._running:
                key = id(item.queue)
                running[key] = running.get(key, 0) + len(item.deliveries)
            return {
                queue.name: (
                    running.get(id(queue), 0),
                    sum(len(item.deliveries) for item in queue.queued),
                )
                for queue in listed
            }


# A receive's worth: how far a burst may exceed the bound on messages not started.
BATCH_SLACK = 10
# Messages a queue starts in one turn of the round-robin: one receive's, one delete batch's.
TURN_MESSAGES = 10
_HELD_STATES = frozenset({DeliveryState.QUEUED, DeliveryState.RUNNING})


def _smallest_batch(limit: int, want: int) -> int:
    """The smallest grant worth a receive under a bound of `limit` held messages."""
    return want if limit >= 2 * want else 1
