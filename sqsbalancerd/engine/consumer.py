"""The engine's face: consume the queues it is told it owns, and drain them on request.

Coordination drives it through `set_owned`, `pause_receiving`/`resume_receiving` and the
receive budget; it learns a removed queue is fully drained through `on_released`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sqsbalancerd.clock import Clock
from sqsbalancerd.config import Settings
from sqsbalancerd.discovery import QueueInfo
from sqsbalancerd.engine.acks import SENDER_THREADS, Acknowledger, extension_lead_s
from sqsbalancerd.engine.dispatch import Dispatcher
from sqsbalancerd.engine.poller import Poller, ReceiveGate
from sqsbalancerd.engine.receivers import Receivers
from sqsbalancerd.engine.settle import Settler
from sqsbalancerd.engine.state import (
    Delivery,
    DeliveryState,
    QueuePolicy,
    QueueRuntime,
    TokenBucket,
)
from sqsbalancerd.engine.workers import AsyncBridge, Tracing, Worker
from sqsbalancerd.handler import ResolvedHandler
from sqsbalancerd.stats import QueueStats, Stats, StatsSnapshot

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

logger = logging.getLogger(__name__)

# Twice a second: a short visibility timeout leaves little slack for a late extension.
EXTENSION_CHECK_S = 0.5
# An async call past its deadline gets this long to be cancelled on its loop.
ASYNC_CANCEL_GRACE_S = 2.0
# Event-loop lag worth a log line; health fails past the handler timeout (or this default).
LOOP_BLOCKED_S = 1.0
DEFAULT_LOOP_LAG_LIMIT_S = 60.0
# At stop, how long idle workers get to notice (longer than a take timeout).
WORKER_JOIN_S = 1.0
# A set_owned call starts this many new queues itself; the rest start on the starter thread.
# Starting a queue starts a thread (~4 ms each on a loaded box, slower as threads pile up):
# 10,000 of them inside set_owned took 287 s and held the coordinator's round, heartbeat
# included, for all of it.
INLINE_STARTS = 32
# Longest the starter thread sleeps before looking at its stop flag again.
STARTER_WAIT_S = 1.0


class ThreadHandle(Protocol):
    def is_alive(self) -> bool: ...

    def join(self, timeout: float | None = None) -> None: ...


class Spawner(Protocol):
    """Starts a named, supervised loop `run(stop)`; only the runtime implements it."""

    def spawn(
        self, name: str, run: Callable[[threading.Event], None], stop: threading.Event
    ) -> ThreadHandle: ...


@dataclass(frozen=True, slots=True)
class HandlerSet:
    """The default handler and the per-queue ones from [[queue]] overrides."""

    default: ResolvedHandler | None
    by_path: dict[str, ResolvedHandler]

    def for_queue(self, settings: Settings, queue_name: str) -> ResolvedHandler:
        override = settings.override_for(queue_name)
        if override is not None and override.handler:
            return self.by_path[override.handler]
        if self.default is None:
            raise LookupError(f"no handler for queue {queue_name}")
        return self.default


def build_policy(settings: Settings, info: QueueInfo) -> QueuePolicy:
    override = settings.override_for(info.name)
    sqs = settings.sqs
    visibility = (override.visibility_timeout if override else None) or sqs.visibility_timeout
    wait = (
        override.wait_time_seconds if override and override.wait_time_seconds is not None else None
    )
    return QueuePolicy(
        visibility_timeout_s=visibility or info.visibility_timeout_s,
        is_visibility_configured=visibility is not None,
        wait_time_s=sqs.wait_time_seconds if wait is None else wait,
        max_messages=(override.max_messages if override else None) or sqs.max_messages,
        max_concurrency=override.max_concurrency if override else None,
        max_rate_per_s=override.max_rate if override else None,
        retry=(override.retry if override else None) or settings.retry,
        max_extension_s=sqs.max_extension,
        message_attribute_names=sqs.message_attribute_names,
        handler_timeout_s=(override.handler_timeout if override else None)
        or settings.workers.handler_timeout,
        max_receive_count=info.max_receive_count,
        idle_latency_s=sqs.idle_latency
        if override is None or override.idle_latency is None
        else override.idle_latency,
    )


@dataclass(slots=True)
class _Owned:
    queue: QueueRuntime
    receivers: Receivers

    @property
    def stop(self) -> threading.Event:
        return self.receivers.stop


class Engine:
    def __init__(
        self,
        *,
        sqs: SQSClient,
        ack_sqs: SQSClient | None = None,
        settings: Settings,
        handlers: HandlerSet,
        stats: Stats,
        clock: Clock,
        spawner: Spawner,
        on_released: Callable[[str], None] | None = None,
        on_gone: Callable[[str], None] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._sqs = sqs
        self._settings = settings
        self._handlers = handlers
        self._stats = stats
        self._clock = clock
        self._spawner = spawner
        self._on_released = on_released
        self._on_gone = on_gone
        self._tracing = tracing
        self._lock = threading.RLock()
        self._owned: dict[str, _Owned] = {}
        self._stopping: dict[str, _Owned] = {}
        self._wanted: dict[str, QueueInfo] = {}
        # Owned but not started yet, in the order set_owned gave them (see INLINE_STARTS).
        self._pending: dict[str, QueueInfo] = {}
        self._starts_wanted = threading.Event()
        self._starter_stop = threading.Event()
        self._workers: list[Worker] = []
        self._workers_stop = threading.Event()
        self._acks_stop = threading.Event()
        self._threads: list[ThreadHandle] = []
        self._acks_thread: ThreadHandle | None = None
        self.gate = ReceiveGate()
        workers = settings.workers
        self.dispatcher = Dispatcher(
            capacity=workers.pool_size + workers.queue_size,
            clock=clock,
            max_queued=workers.queue_size,
            max_held_bytes=workers.max_held_bytes,
        )
        # Acks may use their own client: a short read timeout, not the long poll's.
        self.acks = Acknowledger(
            ack_sqs or sqs, stats=stats, clock=clock, on_settled=self._check_released
        )
        self.acks.set_extension_source(self._extensions_due, every_s=EXTENSION_CHECK_S)
        self.settler = Settler(dispatcher=self.dispatcher, acks=self.acks, stats=stats, clock=clock)
        self.acks.set_lapse_handler(self.settler.lapsed)
        self.acks.set_extension_failure_handler(self.settler.extension_failed)
        self.bridge = AsyncBridge(clock) if self._needs_event_loop() else None
        self._is_loop_blocked = False

    def _needs_event_loop(self) -> bool:
        handlers = [self._handlers.default, *self._handlers.by_path.values()]
        return any(h is not None and h.is_async for h in handlers)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the acknowledger, the worker pool and the async loop (no pollers yet)."""
        if self.bridge is not None:
            self._threads.append(
                self._spawner.spawn("async-handlers", self.bridge.run, self._workers_stop)
            )
        self._threads.append(
            self._spawner.spawn("poller-starter", self._run_starter, self._starter_stop)
        )
        self._acks_thread = self._spawner.spawn("acks", self.acks.run, self._acks_stop)
        self._threads.append(self._acks_thread)
        for index in range(1, SENDER_THREADS):
            self._threads.append(
                self._spawner.spawn(f"acks-{index}", self.acks.run_sender, self._acks_stop)
            )
        for index in range(self._settings.workers.pool_size):
            worker = Worker(
                dispatcher=self.dispatcher,
                settler=self.settler,
                acks=self.acks,
                stats=self._stats,
                clock=self._clock,
                bridge=self.bridge,
                tracing=self._tracing,
            )
            self._workers.append(worker)
            self._threads.append(
                self._spawner.spawn(f"worker-{index}", worker.run, self._workers_stop)
            )

    def set_owned(self, queues: Iterable[QueueInfo]) -> None:
        """Consume exactly these queues: drain removed ones, start new ones.

        Returns after starting at most INLINE_STARTS new queues: the starter thread starts
        the rest, one at a time, so that taking thousands does not hold the caller (the
        coordinator's round) for minutes.
        """
        wanted = {q.name: q for q in queues}
        with self._lock:
            self._wanted = wanted
            for name in list(self._owned):
                if name not in wanted:
                    self._stop_queue(name)
            self._pending = {
                name: info
                for name, info in wanted.items()
                if name not in self._owned and name not in self._stopping
            }
        self.start_pending(limit=INLINE_STARTS)
        if self._pending:
            self._starts_wanted.set()

    def start_pending(
        self, *, limit: int | None = None, stop: threading.Event | None = None
    ) -> int:
        """Start waiting queues (up to `limit`); returns how many. The lock is taken once per
        queue, so the acks thread and set_owned never wait behind a long run of starts."""
        started = 0
        while (limit is None or started < limit) and not (stop is not None and stop.is_set()):
            with self._lock:
                if not self._pending or self.dispatcher_stopped:
                    return started
                name = next(iter(self._pending))
                self._start_queue(self._pending.pop(name))
            started += 1
        return started

    def _run_starter(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if not self._starts_wanted.wait(STARTER_WAIT_S):
                continue
            self._starts_wanted.clear()
            started_s = self._clock.monotonic()
            count = self.start_pending(stop=stop)
            if count:
                logger.info(
                    "pollers started",
                    extra={
                        "count": count,
                        "duration_s": round(self._clock.monotonic() - started_s, 3),
                    },
                )

    def owned(self) -> tuple[str, ...]:
        """The queues consumed now or about to be (a poller not started yet included)."""
        with self._lock:
            return tuple(sorted({*self._owned, *self._pending}))

    def pause_receiving(self) -> None:
        self.gate.pause()

    def resume_receiving(self) -> None:
        self.gate.resume()

    def set_receive_budget(
        self,
        budget_s: Callable[[], float | None],
        renewal_due_in_s: Callable[[], float | None] | None = None,
    ) -> None:
        self.gate.set_budget(budget_s, renewal_due_in_s)

    def notify_renewed(self) -> None:
        self.gate.notify_renewed()

    # -- drain ----------------------------------------------------------------------------

    def stop_receiving(self) -> int:
        """Drain step 1: no receive starts from now on; unstarted messages are released."""
        released = self.dispatcher.stop_receiving()
        self._starter_stop.set()
        self._starts_wanted.set()
        with self._lock:
            self._pending.clear()
            for owned in self._owned.values():
                owned.stop.set()
        self.acks.wake_held_back()
        self._release(released)
        return len(released)

    def wait_pollers(self, deadline_s: float, abort: threading.Event | None = None) -> bool:
        """Wait for in-flight long polls to end (their messages are released as they do)."""
        with self._lock:
            owned = [*self._owned.values(), *self._stopping.values()]
            threads = [t for o in owned for t in o.receivers.threads]
        for thread in threads:
            while thread.is_alive():
                remaining = deadline_s - self._clock.monotonic()
                if remaining <= 0 or (abort is not None and abort.is_set()):
                    return False
                thread.join(min(remaining, 0.1))
        return True

    def wait_handlers(self, deadline_s: float, abort: threading.Event | None = None) -> bool:
        return self.dispatcher.wait_until_idle(deadline_s, abort=abort)

    def abandon_running(self) -> int:
        """At the deadline: running handlers' results will be discarded and their messages
        released now (as for a handler timeout); returns how many messages."""
        items = [i for i in self.dispatcher.running_items() if not i.is_timed_out]
        for item in items:
            self.settler.time_out(item, why="handler abandoned at the shutdown deadline")
        return sum(len(item.deliveries) for item in items)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Last step: flush pending acks, stop workers and the acknowledger.

        Only the acknowledger's flush gets `timeout_s`. An idle worker ends within one take
        timeout; a worker still inside an abandoned handler is not waited for (its result is
        discarded, and it is a daemon thread), or the shutdown deadline would not hold.
        """
        self._starter_stop.set()
        self._starts_wanted.set()
        self._workers_stop.set()
        self._acks_stop.set()
        if self.bridge is not None:
            self.bridge.close()
        now = self._clock.monotonic()
        deadline = now + timeout_s
        others_deadline = now + min(timeout_s, WORKER_JOIN_S)
        for thread in self._threads:
            until = deadline if thread is self._acks_thread else others_deadline
            thread.join(max(0.0, until - self._clock.monotonic()))

    # -- queues ---------------------------------------------------------------------------

    def _start_queue(self, info: QueueInfo) -> None:
        handler = self._handlers.for_queue(self._settings, info.name)
        policy = build_policy(self._settings, info)
        queue = QueueRuntime(
            info=info,
            policy=policy,
            invoke=handler.function,
            is_batch=handler.is_batch,
            is_async=handler.is_async,
            handler_path=handler.path,
            rate=TokenBucket(policy.max_rate_per_s, self._clock.monotonic())
            if policy.max_rate_per_s
            else None,
        )
        self.dispatcher.add_queue(queue)

        def make_poller(is_extra: bool) -> Poller:
            return Poller(
                queue,
                sqs=self._sqs,
                dispatcher=self.dispatcher,
                acks=self.acks,
                gate=self.gate,
                stats=self._stats,
                clock=self._clock,
                on_gone=self._queue_gone,
                is_extra=is_extra,
            )

        receivers = Receivers(queue, make_poller, self._spawner.spawn)
        receivers.start()
        self._owned[info.name] = _Owned(queue, receivers)
        logger.info("consuming queue", extra={"queue": info.name})

    def _stop_queue(self, name: str) -> None:
        owned = self._owned.pop(name)
        owned.stop.set()
        self._stopping[name] = owned
        self._release(self.dispatcher.stop_queue(owned.queue))
        logger.info("releasing queue", extra={"queue": name})

    def _queue_gone(self, queue: QueueRuntime) -> None:
        # First, outside our lock (the listener may call back into set_owned): whoever
        # assigns queues must forget this one before its release arrives, or it takes the
        # queue again at once (issue 11: re-acquired and released every round).
        if self._on_gone is not None:
            self._on_gone(queue.name)
        with self._lock:
            self._wanted.pop(queue.name, None)
            if queue.name in self._owned:
                self._stop_queue(queue.name)

    def _check_released(self, name: str) -> None:
        with self._lock:
            owned = self._stopping.get(name)
            if owned is None or owned.receivers.is_alive():
                return
            if not self.dispatcher.is_queue_idle(owned.queue) or self.acks.pending_for(
                owned.queue.url
            ):
                return
            del self._stopping[name]
            self.dispatcher.remove_queue(owned.queue)
            info = self._wanted.get(name)
            if info is not None and not self.dispatcher_stopped:
                self._start_queue(info)  # owned again while it drained
                return
            self._stats.forget_queue(name)
        logger.info("queue released", extra={"queue": name})
        if self._on_released is not None:
            self._on_released(name)

    @property
    def dispatcher_stopped(self) -> bool:
        return self.dispatcher.is_receiving_stopped

    def _release(self, deliveries: list[Delivery]) -> None:
        if deliveries:
            self.acks.change_visibility(deliveries, 0, reason="release")

    # -- visibility extension -------------------------------------------------------------

    def _extensions_due(self, now_s: float) -> list[tuple[Delivery, int]]:
        """Called on the acks thread each second: what to extend, what has expired."""
        with self._lock:
            stopping = list(self._stopping)
        for name in stopping:
            self._check_released(name)
        self._time_out_calls(now_s)
        self._watch_event_loop()
        self._scale_receivers()
        if self.gate.is_paused:
            # Fenced: others may own our queues by now. Extending what we hold would keep
            # it from them for another timeout (a paused process could hold it for ever).
            return []
        due: list[tuple[Delivery, int]] = []
        expired_queued: list[Delivery] = []
        # A delete that failed and waits for its retry must not let the message reappear.
        for delivery in [*self.dispatcher.held_deliveries(), *self.acks.retrying_deletes()]:
            visibility_s = delivery.queue.policy.visibility_timeout_s
            lead_s = extension_lead_s(visibility_s)
            if delivery.visible_until_s - now_s > lead_s:
                continue
            budget_s = delivery.received_at_s + delivery.queue.policy.max_extension_s - now_s
            timeout_s = int(min(visibility_s, budget_s))
            if timeout_s >= 1 and now_s + timeout_s > delivery.visible_until_s:
                due.append((delivery, timeout_s))
            elif budget_s < 1:
                self._expire(delivery, expired_queued)
            # else: already invisible until max_extension; a call would not move the deadline
        if expired_queued:
            self.dispatcher.drop_expired(expired_queued)
        return due

    def _scale_receivers(self) -> None:
        with self._lock:
            owned = list(self._owned.values())
        for entry in owned:
            entry.receivers.scale(self.dispatcher, self._settings.workers.pool_size)

    def _time_out_calls(self, now_s: float) -> None:
        """Calls past handler_timeout: a sync one cannot be stopped, so its messages are
        released and its slot counts as stuck; an async one is cancelled on its loop, and
        is treated like a sync one only if the loop cannot cancel it (blocked)."""
        for item in self.dispatcher.running_items():
            if item.deadline_s is None or item.is_timed_out:
                continue
            grace_s = ASYNC_CANCEL_GRACE_S if item.queue.is_async else 0.0
            if now_s >= item.deadline_s + grace_s:
                if self.dispatcher.claim_timeout(item):
                    self._stats.count(item.queue.name, "timed_out", len(item.deliveries))
                self.settler.time_out(item, why="handler timed out; result will be discarded")

    def _watch_event_loop(self) -> None:
        if self.bridge is None:
            return
        lag_s = self.bridge.lag_s()
        if lag_s < LOOP_BLOCKED_S:
            self._is_loop_blocked = False
            return
        if not self._is_loop_blocked:  # once per blocked spell
            self._is_loop_blocked = True
            logger.error(
                "an async handler is blocking the handlers' event loop (a blocking call "
                "inside async def?)",
                extra={"handler": ", ".join(self.bridge.running_paths()), "lag_s": lag_s},
            )

    def event_loop_lag_limit_s(self) -> float:
        timeouts = [self._settings.workers.handler_timeout]
        timeouts += [q.handler_timeout for q in self._settings.queue]
        known = [t for t in timeouts if t is not None]
        return max(known) if known else DEFAULT_LOOP_LAG_LIMIT_S

    def _expire(self, delivery: Delivery, expired_queued: list[Delivery]) -> None:
        delivery.is_expired = True
        self._stats.count(delivery.queue.name, "expired")
        logger.warning(
            "message reached max_extension; no longer extended",
            extra={"queue": delivery.queue.name, "message_id": delivery.message.message_id},
        )
        if delivery.state is DeliveryState.QUEUED:
            expired_queued.append(delivery)

    # -- stats ----------------------------------------------------------------------------

    def stuck_slots(self) -> int:
        return sum(
            1
            for item in self.dispatcher.running_items()
            if any(d.is_expired for d in item.deliveries)
        )

    def snapshot(self, instance_id: str) -> StatsSnapshot:
        counters = self._stats.queue_counters()
        with self._lock:
            runtimes = {
                name: o.queue for name, o in [*self._stopping.items(), *self._owned.items()]
            }
            pollers = [p for o in self._owned.values() for p in o.receivers.pollers]
        names = sorted(set(counters) | set(runtimes))
        counts = self.dispatcher.counts_by_queue(runtimes.values())
        queues = tuple(
            QueueStats(queue=name, **counters.get(name, {}), **_counts(counts.get(name)))
            for name in names
        )
        durations, ages = self._stats.histograms()
        running = self.dispatcher.running_items()
        idling, requests_per_hour = _idle_figures(pollers)
        return StatsSnapshot(
            instance_id=instance_id,
            owned_queues=self.owned(),
            queues=queues,
            workers_busy=len(running),
            pool_size=self._settings.workers.pool_size,
            stuck_slots=self.stuck_slots(),
            work_queue_depth=self.dispatcher.depth(),
            aws_calls=self._stats.aws_calls(),
            handler_duration=durations,
            message_age=ages,
            loop_ticks_age_s=self._tick_ages(pollers),
            aws_consecutive_failures=self._stats.failure_streaks(),
            event_loop_lag_s=self.bridge.lag_s() if self.bridge is not None else None,
            event_loop_lag_limit_s=self.event_loop_lag_limit_s(),
            retired=self._stats.retired_counters(),
            idling_queues=idling,
            estimated_sqs_requests_per_hour=requests_per_hour,
        )

    def idle_figures(self) -> tuple[int, float]:
        """(owned queues idling, SQS requests an hour they cost while nothing arrives).

        Called by the heartbeat: without our lock, which `set_owned` holds while it starts
        a thousand pollers (a heartbeat waiting on it would fence us). list() of a dict's
        values is one C call under the GIL, safe against a concurrent change."""
        owned = list(self._owned.values())
        return _idle_figures([p for o in owned for p in list(o.receivers.pollers)])

    def _tick_ages(self, pollers: list[Poller]) -> dict[str, float]:
        now = self._clock.monotonic()
        ages = {"acks": now - self.acks.last_tick_s}
        if pollers:
            ages["pollers"] = max(now - p.last_tick_s for p in pollers)
        busy = len(self.dispatcher.running_items())
        idle_ticks = sorted(now - w.last_tick_s for w in self._workers)
        # Busy workers are inside a handler, not stalled: judge only the idle ones.
        idle = idle_ticks[: max(0, len(idle_ticks) - busy)]
        if idle:
            ages["workers"] = max(idle)
        return ages


def _idle_figures(pollers: list[Poller]) -> tuple[int, float]:
    """One main poller per owned queue (extras end with the burst that started them)."""
    main = [p for p in pollers if not p.is_extra]
    idling = sum(1 for p in main if p.idle.is_idling)
    return idling, sum(p.idle.requests_per_hour(p.queue.policy.wait_time_s) for p in main)


def _counts(counts: tuple[int, int] | None) -> dict[str, int]:
    running, queued = counts or (0, 0)
    return {"running": running, "queued": queued}
