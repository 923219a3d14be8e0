"""The runtime: supervised threads, signal handlers, and the drain sequence."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from support import FakeClock, wait_until

from sqsbalancerd.runtime import POLL_END_MARGIN_S, Runtime, ThreadSupervisor, signal_handlers


class FakeService:
    """Records the drain calls in order; each step's answer is configurable."""

    def __init__(
        self,
        *,
        on_start: Callable[[ThreadSupervisor, Callable[[str], None]], None] | None = None,
        handlers_finish: bool = True,
    ) -> None:
        self.calls: list[tuple[str, Any]] = []
        self._on_start = on_start
        self._handlers_finish = handlers_finish
        self.abort_seen: list[bool] = []

    def start(self, spawner: ThreadSupervisor, fail: Callable[[str], None]) -> None:
        self.calls.append(("start", None))
        if self._on_start is not None:
            self._on_start(spawner, fail)

    def stop_receiving(self) -> int:
        self.calls.append(("stop_receiving", None))
        return 4

    def wait_pollers(self, deadline_s: float, abort: threading.Event) -> bool:
        self.calls.append(("wait_pollers", deadline_s))
        self.abort_seen.append(abort.is_set())
        return True

    def wait_handlers(self, deadline_s: float, abort: threading.Event) -> bool:
        self.calls.append(("wait_handlers", deadline_s))
        self.abort_seen.append(abort.is_set())
        return self._handlers_finish and not abort.is_set()

    def abandon_running(self) -> int:
        self.calls.append(("abandon_running", None))
        return 2

    def finish(self) -> None:
        self.calls.append(("finish", None))

    def summary(self) -> dict[str, object]:
        self.calls.append(("summary", None))
        return {"deleted": 7}

    @property
    def steps(self) -> list[str]:
        return [name for name, _ in self.calls]


def make_runtime(service: FakeService, clock: FakeClock | None = None, **kwargs: Any) -> Runtime:
    options: dict[str, Any] = {
        "clock": clock or FakeClock(),
        "shutdown_timeout_s": 30.0,
        "poll_wait_s": 20.0,
        "install_signals": False,
    }
    options.update(kwargs)
    return Runtime(service, **options)


# -- request_stop and the drain sequence ----------------------------------------------------


def test_request_stop_once_drains_in_order_and_exits_zero():
    clock = FakeClock(start_s=100.0)
    runtime: Runtime
    service = FakeService(on_start=lambda spawner, fail: runtime.request_stop())
    runtime = make_runtime(service, clock)

    report = runtime.run()

    assert service.steps == [
        "start",
        "stop_receiving",
        "wait_pollers",
        "wait_handlers",
        "finish",
        "summary",
    ]
    deadlines = dict(service.calls)
    assert deadlines["wait_pollers"] == 100.0 + 20.0 + POLL_END_MARGIN_S
    assert deadlines["wait_handlers"] == 100.0 + 30.0
    assert service.abort_seen == [False, False]
    assert (report.released, report.abandoned, report.is_forced) == (4, 0, False)
    assert report.counts["deleted"] == 7
    assert report.exit_code == 0
    assert runtime.started.is_set()


def test_request_stop_twice_is_forced_and_exits_one():
    runtime: Runtime

    def two_signals(spawner: ThreadSupervisor, fail: Callable[[str], None]) -> None:
        runtime.request_stop(signal.SIGTERM)
        runtime.request_stop(signal.SIGINT)

    service = FakeService(on_start=two_signals)
    runtime = make_runtime(service)
    report = runtime.run()

    assert runtime.force_requested.is_set()
    assert runtime.signals_received == [signal.SIGTERM, signal.SIGINT]
    assert service.abort_seen == [True, True]  # the waits were told to give up
    assert "abandon_running" in service.steps
    assert report.is_forced
    assert report.exit_code == 1


def test_handlers_past_the_deadline_are_abandoned_and_exit_one():
    runtime: Runtime
    service = FakeService(
        on_start=lambda spawner, fail: runtime.request_stop(), handlers_finish=False
    )
    runtime = make_runtime(service)
    report = runtime.run()
    assert service.steps.index("abandon_running") < service.steps.index("finish")
    assert (report.abandoned, report.is_forced, report.exit_code) == (2, False, 1)


def test_fail_drains_and_reports_the_failure():
    service = FakeService(on_start=lambda spawner, fail: fail("the table vanished"))
    report = make_runtime(service).run()
    assert "finish" in service.steps
    assert report.failure == "the table vanished"
    assert report.exit_code == 1


def test_a_stop_from_another_thread_wakes_the_main_thread():
    stopper = threading.Event()
    runtime: Runtime

    def spawn_stopper(spawner: ThreadSupervisor, fail: Callable[[str], None]) -> None:
        def run(stop: threading.Event) -> None:
            stopper.wait(10)
            runtime.request_stop()

        spawner.spawn("stopper", run, threading.Event())

    service = FakeService(on_start=spawn_stopper)
    runtime = make_runtime(service)
    stopper.set()
    assert runtime.run().exit_code == 0


def test_threads_are_stopped_when_start_fails():
    ran = threading.Event()

    def start_then_fail(spawner: ThreadSupervisor, fail: Callable[[str], None]) -> None:
        spawner.spawn("loop", lambda stop: (ran.set(), stop.wait(30)), threading.Event())
        assert ran.wait(5)
        raise RuntimeError("startup failed")

    runtime = make_runtime(FakeService(on_start=start_then_fail))
    with pytest.raises(RuntimeError, match="startup failed"):
        runtime.run()
    assert runtime.supervisor.alive() == []  # and the autouse fixture checks the thread


# -- signals --------------------------------------------------------------------------------


def test_real_signals_drain_then_force_and_the_old_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def signal_twice(spawner: ThreadSupervisor, fail: Callable[[str], None]) -> None:
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert runtime.force_requested.wait(5)  # handled off the main thread, in order

    service = FakeService(on_start=signal_twice)
    runtime = make_runtime(service, install_signals=True)
    report = runtime.run()

    assert runtime.signals_received == [signal.SIGTERM, signal.SIGINT]
    assert report.is_forced and report.exit_code == 1
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd was given back too


@pytest.mark.timeout(20)
def test_a_signal_while_the_main_thread_holds_the_stop_events_lock_does_not_deadlock():
    """A Python signal handler calling Event.set() deadlocks when the signal lands while
    the main thread is inside that Event's wait() holding its condition lock. Here the main
    thread holds exactly that lock when the signal arrives: the stop must still go through."""

    def signal_while_holding(spawner: ThreadSupervisor, fail: Callable[[str], None]) -> None:
        with runtime.stop_requested._cond:  # what Event.wait() holds on entry and exit
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # give the main thread bytecodes to run a Python handler on
        assert runtime.stop_requested.wait(5)

    runtime = make_runtime(FakeService(on_start=signal_while_holding), install_signals=True)
    report = runtime.run()
    assert runtime.signals_received == [signal.SIGTERM]
    assert report.exit_code == 0


def test_handlers_are_restored_even_when_start_raises():
    before = signal.getsignal(signal.SIGTERM)

    def boom(spawner: ThreadSupervisor, fail: Callable[[str], None]) -> None:
        raise ValueError("boom")

    runtime = make_runtime(FakeService(on_start=boom), install_signals=True)
    with pytest.raises(ValueError, match="boom"):
        runtime.run()
    assert signal.getsignal(signal.SIGTERM) is before


def test_install_signals_false_leaves_handlers_alone():
    before = signal.getsignal(signal.SIGTERM)
    seen: list[Any] = []
    runtime: Runtime

    def check(spawner: ThreadSupervisor, fail: Callable[[str], None]) -> None:
        seen.append(signal.getsignal(signal.SIGTERM))
        runtime.request_stop()

    runtime = make_runtime(FakeService(on_start=check), install_signals=False)
    runtime.run()
    assert seen == [before]


def test_signal_handlers_outside_the_main_thread_install_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen: list[Any] = []
    supervisor = ThreadSupervisor()

    def run(stop: threading.Event) -> None:
        with signal_handlers(lambda signum: None, install=True):
            seen.append(signal.getsignal(signal.SIGTERM))

    handle = supervisor.spawn("off-main", run, threading.Event())
    handle.join(5)
    assert seen == [before]


# -- the supervisor -------------------------------------------------------------------------


def test_supervisor_restarts_a_crashing_loop():
    crashes: list[str] = []
    calls = []
    running = threading.Event()

    def run(stop: threading.Event) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first run crashes")
        running.set()
        stop.wait(30)

    supervisor = ThreadSupervisor(on_crash=crashes.append)
    stop = threading.Event()
    handle = supervisor.spawn("flaky", run, stop)

    assert running.wait(10)
    assert crashes == ["flaky"]
    assert handle.restarts == 1
    assert handle.thread.name == "sqsb-flaky"
    assert handle.thread.daemon
    assert supervisor.alive() == ["flaky"]
    assert supervisor.stop_all(timeout_s=5) == []
    assert stop.is_set()
    assert len(calls) == 2


def test_supervisor_does_not_restart_a_loop_that_returns():
    calls = []
    supervisor = ThreadSupervisor()
    handle = supervisor.spawn("once", lambda stop: calls.append(1), threading.Event())
    handle.join(5)
    assert not handle.is_alive()
    assert calls == [1]
    assert handle.restarts == 0


def test_stop_all_reports_loops_that_ignore_their_stop_flag():
    release = threading.Event()
    supervisor = ThreadSupervisor()
    supervisor.spawn("stubborn", lambda stop: release.wait(30), threading.Event())
    wait_until(lambda: supervisor.alive() == ["stubborn"], timeout_s=5)
    assert supervisor.stop_all(timeout_s=0.1) == ["stubborn"]
    release.set()
    assert supervisor.stop_all(timeout_s=5) == []
