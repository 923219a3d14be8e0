"""The sole owner of threads, signals and the drain sequence.

Signals are acted on by a thread of their own, never inside a Python signal handler: a
handler runs between two bytecodes of the main thread, possibly while that thread holds
the very lock (an Event's condition) the handler would take, and deadlocks. The C-level
handler writes the signal number to a socket (`signal.set_wakeup_fd`); the `sqsb-signals`
thread reads it and calls back. First SIGTERM/SIGINT drains; a second skips the waits.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType
from typing import Protocol, TypeVar

from sqsbalancerd.clock import Clock

logger = logging.getLogger(__name__)

_RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
# A poll in flight ends within WaitTimeSeconds; allow this much for its round trip.
POLL_END_MARGIN_S = 5.0


@dataclass(slots=True)
class SupervisedThread:
    name: str
    thread: threading.Thread
    stop: threading.Event
    restarts: int = 0

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)


class ThreadSupervisor:
    """Starts named daemon threads running `run(stop)`; restarts a loop that crashes."""

    def __init__(self, *, on_crash: Callable[[str], None] | None = None) -> None:
        self._threads: list[SupervisedThread] = []
        self._lock = threading.Lock()
        self._on_crash = on_crash
        self._pruned_size = 0

    def spawn(
        self, name: str, run: Callable[[threading.Event], None], stop: threading.Event
    ) -> SupervisedThread:
        handle = SupervisedThread(name, threading.Thread(), stop)
        # Daemon: a handler that never returns must not keep the process alive after exit.
        handle.thread = threading.Thread(
            target=self._supervise, args=(handle, run), name=f"sqsb-{name}", daemon=True
        )
        with self._lock:
            self._prune()
            self._threads.append(handle)
        handle.thread.start()
        return handle

    def _prune(self) -> None:
        """Forget ended threads once the list has doubled since the last look: pruning on
        every spawn made starting 10,000 pollers quadratic (16 s of 2,000 starts)."""
        if len(self._threads) < max(64, 2 * self._pruned_size):
            return
        self._threads = [t for t in self._threads if t.is_alive()]
        self._pruned_size = len(self._threads)

    def _supervise(self, handle: SupervisedThread, run: Callable[[threading.Event], None]) -> None:
        while not handle.stop.is_set():
            try:
                run(handle.stop)
                return
            except Exception:
                logger.exception("loop crashed; restarting", extra={"loop": handle.name})
                if self._on_crash is not None:
                    self._on_crash(handle.name)
                backoff = _RESTART_BACKOFF_S[min(handle.restarts, len(_RESTART_BACKOFF_S) - 1)]
                handle.restarts += 1
                handle.stop.wait(backoff)

    def alive(self) -> list[str]:
        with self._lock:
            return [t.name for t in self._threads if t.is_alive()]

    def stop_all(self, timeout_s: float) -> list[str]:
        """Set every stop flag and join; returns the names still alive."""
        with self._lock:
            threads = list(self._threads)
        for handle in threads:
            handle.stop.set()
        deadline = time.monotonic() + timeout_s
        for handle in threads:
            handle.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in threads if t.is_alive()]


_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def map_bounded(
    function: Callable[[_Item], _Result],
    items: Sequence[_Item],
    *,
    max_workers: int,
    name: str,
) -> list[_Result]:
    """`function` over `items`, at most `max_workers` at once; results in order.

    For bursts of independent calls (queue attributes): the pool's threads are joined before
    this returns, and the first exception cancels what has not started, then propagates.
    """
    if max_workers <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    pool = ThreadPoolExecutor(max_workers=min(max_workers, len(items)), thread_name_prefix=name)
    try:
        return list(pool.map(function, items))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Written by the context manager itself to end the reader thread; no signal has number 0.
_STOP_READER = b"\x00"


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: the wakeup socket already carries the signal."""


def _read_signals(reader: socket.socket, callback: Callable[[int], None]) -> None:
    while True:
        try:
            data = reader.recv(64)
        except InterruptedError:
            continue
        except OSError:
            return
        for signum in data:
            if signum == _STOP_READER[0]:
                return
            try:
                callback(signum)
            except Exception:  # a broken callback must not end signal handling
                logger.exception("signal callback failed", extra={"signal": signum})


@contextlib.contextmanager
def signal_handlers(callback: Callable[[int], None], *, install: bool = True) -> Iterator[None]:
    """Call `callback(signum)` on the `sqsb-signals` thread for each SIGTERM/SIGINT.

    Restores the previous handlers and wakeup fd on exit. Outside the main thread (or with
    `install=False`) nothing is installed: only the main thread may set signal handlers.
    """
    if not install or threading.current_thread() is not threading.main_thread():
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)  # set_wakeup_fd requires it: the C handler must never block
    thread = threading.Thread(
        target=_read_signals, args=(reader, callback), name="sqsb-signals", daemon=True
    )
    thread.start()
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    try:
        for signum in _SIGNALS:
            signal.signal(signum, _ignore)
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        signal.set_wakeup_fd(previous_fd)
        with contextlib.suppress(OSError):
            writer.send(_STOP_READER)
        thread.join(timeout=2.0)
        writer.close()
        reader.close()


class Service(Protocol):
    """What the runtime runs: the application, wired by app.py."""

    def start(self, spawner: ThreadSupervisor, fail: Callable[[str], None]) -> None: ...

    def stop_receiving(self) -> int: ...

    def wait_pollers(self, deadline_s: float, abort: threading.Event) -> bool: ...

    def wait_handlers(self, deadline_s: float, abort: threading.Event) -> bool: ...

    def abandon_running(self) -> int: ...

    def finish(self) -> None: ...

    def summary(self) -> dict[str, object]: ...


@dataclass(slots=True)
class DrainReport:
    released: int = 0
    abandoned: int = 0
    is_forced: bool = False
    failure: str | None = None
    counts: dict[str, object] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if self.abandoned or self.is_forced or self.failure else 0


class Runtime:
    def __init__(
        self,
        service: Service,
        *,
        clock: Clock,
        shutdown_timeout_s: float,
        poll_wait_s: float,
        install_signals: bool = True,
    ) -> None:
        self._service = service
        self._clock = clock
        self._shutdown_timeout_s = shutdown_timeout_s
        self._poll_wait_s = poll_wait_s
        self._install_signals = install_signals
        self.supervisor = ThreadSupervisor()
        self.stop_requested = threading.Event()
        self.force_requested = threading.Event()
        self.started = threading.Event()
        self.signals_received: list[int] = []
        self._failure: str | None = None

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """First call: drain. Second: skip the waits."""
        self.signals_received.append(signum)
        if self.stop_requested.is_set():
            self.force_requested.set()
        else:
            self.stop_requested.set()

    def fail(self, reason: str) -> None:
        """A part hit something fatal (e.g. the table vanished): drain and exit 1."""
        if self._failure is None:
            self._failure = reason
        self.stop_requested.set()

    def run(self) -> DrainReport:
        with signal_handlers(self.request_stop, install=self._install_signals):
            try:
                self._service.start(self.supervisor, self.fail)
            except BaseException:
                # A start that fails halfway (e.g. a missing named queue) must not leave
                # the loops it already started running.
                self.supervisor.stop_all(timeout_s=2.0)
                raise
            self.started.set()
            self.stop_requested.wait()
            if self._failure:
                logger.error("stopping after a fatal error", extra={"error": self._failure})
            else:
                logger.info(
                    "stop requested; draining", extra={"timeout_s": self._shutdown_timeout_s}
                )
            return self._drain()

    def _drain(self) -> DrainReport:
        report = DrainReport(failure=self._failure)
        started = self._clock.monotonic()
        deadline = started + self._shutdown_timeout_s
        report.released = self._service.stop_receiving()
        poll_deadline = started + self._poll_wait_s + POLL_END_MARGIN_S
        self._service.wait_pollers(poll_deadline, self.force_requested)
        if not self._service.wait_handlers(deadline, self.force_requested):
            report.abandoned = self._service.abandon_running()
        report.is_forced = self.force_requested.is_set()
        self._service.finish()
        # Workers inside abandoned handlers (or, when forced, a poll still in flight) will not
        # end in time: do not wait for them again.
        is_cut_short = bool(report.abandoned) or report.is_forced
        leftover = self.supervisor.stop_all(timeout_s=0.5 if is_cut_short else 2.0)
        report.counts = self._service.summary()
        report.counts["drain_s"] = round(self._clock.monotonic() - started, 3)
        if leftover:
            report.counts["threads_left"] = leftover
        return report
