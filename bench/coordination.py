"""Takeover after SIGKILL and handoff after SIGTERM, in a 3-instance dynamodb cluster.

The harness trickles messages into every queue, reads ownership from the table, kills the
busiest instance, then stops a second one gracefully, and times: until the table shows
every queue owned by a live instance, and until each affected queue's messages are handled
again. At the end every sent message must have been handled (duplicates are expected only
for messages the killed instance held: they reappear after their visibility timeout).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from bench.consumers.registry import BY_KEY, Launch, start
from bench.harness import Harness, stop_processes, wait_until
from bench.measure import EmulatorProcess, IdLog
from bench.plan import Plan

logger = logging.getLogger("bench")
VISIBILITY_S = 5


class Trickle:
    """One message per queue per second, ids and queues recorded, until stopped."""

    def __init__(self, harness: Harness, urls: list[str]) -> None:
        self._harness, self._urls = harness, urls
        self.sent: dict[str, tuple[str, float]] = {}  # id -> (queue name, sent at)
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Trickle:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            for url in self._urls:
                message_id, sent_at = self._harness.send_one(url)
                self.sent[message_id] = (url.rsplit("/", 1)[-1], sent_at)

    def join(self) -> None:
        self.stop.set()
        self._thread.join()


def coordination(emulator: EmulatorProcess, plan: Plan, out: Path) -> dict[str, Any]:
    results = {"fast": _scenario(emulator, plan, out, is_fast=True)}
    if plan.coordination_default_timings:
        results["default"] = _scenario(emulator, plan, out, is_fast=False)
    return results


def _scenario(emulator: EmulatorProcess, plan: Plan, out: Path, *, is_fast: bool) -> dict[str, Any]:
    harness = Harness(emulator.endpoint)
    run_id = f"coord-{'fast' if is_fast else 'default'}"
    names = [f"{run_id}-q{i:02d}" for i in range(plan.coordination_queues)]
    urls = harness.create_queues(names, visibility_s=VISIBILITY_S)
    harness.create_table(f"bench-{run_id}")
    launch = Launch(
        endpoint=emulator.endpoint,
        run_id=run_id,
        queue_prefix=f"{run_id}-q",
        queue_urls=urls,
        ids_file=out / f"{run_id}.ids",
        log_dir=out,
        wait_s=plan.wait_s,
        is_fast_timings=is_fast,
    )
    spec = BY_KEY["sqsb-ddb3"]
    processes = start(spec, launch)
    instance_of = {f"{spec.key}-{i}": p for i, p in enumerate(processes)}
    owners = lambda: harness.owners(f"bench-{run_id}", run_id)  # noqa: E731
    logger.info(
        "coordination (%s timings): %d queues, 3 instances",
        "fast" if is_fast else "default",
        len(urls),
    )
    trickle = Trickle(harness, urls).start()
    ids = IdLog(launch.ids_file)
    result: dict[str, Any] = {"queues": len(urls)}
    try:
        result["initial_assignment_s"] = _wait_owned(owners, set(instance_of), timeout_s=150)
        result["sigkill"] = _disrupt(owners, instance_of, ids, trickle, signal.SIGKILL)
        result["sigterm"] = _disrupt(owners, instance_of, ids, trickle, signal.SIGTERM)
    finally:
        trickle.join()
        wait_until(
            lambda: ids.poll() >= 0 and ids.unique_of(trickle.sent) >= len(trickle.sent),
            timeout_s=VISIBILITY_S + plan.wait_s + 30,
            every_s=0.5,
        )
        stop_processes(list(instance_of.values()), timeout_s=plan.wait_s + 20)
    ids.poll()
    result.update(
        sent=len(trickle.sent),
        handled=ids.unique_of(trickle.sent),
        duplicates=ids.duplicates_of(trickle.sent),
        lost=len(trickle.sent) - ids.unique_of(trickle.sent),
    )
    harness.delete_queues(urls)
    return result


def _wait_owned(owners: Any, live: set[str], *, timeout_s: float) -> float | None:
    """Seconds until every queue is owned by one of `live` (None: not within timeout_s)."""
    started = time.monotonic()

    def settled() -> bool:
        current = owners()
        return bool(current) and all(o in live for o in current.values())

    if not wait_until(settled, timeout_s=timeout_s, every_s=0.2):
        return None
    return round(time.monotonic() - started, 2)


def _disrupt(
    owners: Any, instance_of: dict[str, Any], ids: IdLog, trickle: Trickle, signum: int
) -> dict[str, Any]:
    current = owners()
    alive = {name for name, p in instance_of.items() if p.poll() is None}
    victim = max(sorted(alive), key=lambda n: sum(1 for o in current.values() if o == n))
    lost_queues = {q for q, o in current.items() if o == victim}
    process = instance_of[victim]
    at_wall, at = time.time(), time.monotonic()
    process.send_signal(signum)
    owned_s = _wait_owned(owners, alive - {victim}, timeout_s=180)
    exit_code = process.wait(timeout=60)
    exited_s = round(time.monotonic() - at, 2)
    resumed_s = _resumed(ids, trickle, lost_queues, at_wall, timeout_s=60)
    name = "SIGKILL" if signum == signal.SIGKILL else "SIGTERM"
    logger.info(
        "  %s %s (%d queues): owned by survivors after %s s, handled again after %s s",
        name,
        victim,
        len(lost_queues),
        owned_s,
        resumed_s,
    )
    return {
        "victim_queues": len(lost_queues),
        "owned_by_survivors_s": owned_s,
        "resumed_s": resumed_s,
        "exit_code": exit_code,
        "exited_s": exited_s,
    }


def _resumed(
    ids: IdLog, trickle: Trickle, queues: set[str], since: float, *, timeout_s: float
) -> float | None:
    """Seconds from `since` until a message sent after it was handled on every queue."""

    def first_after() -> dict[str, float]:
        ids.poll()
        firsts: dict[str, float] = {}
        for message_id, (queue, sent_at) in list(trickle.sent.items()):
            started = ids.first_start.get(message_id)
            if queue in queues and sent_at >= since and started is not None:
                firsts[queue] = min(firsts.get(queue, started), started)
        return firsts

    if not wait_until(lambda: len(first_after()) >= len(queues), timeout_s=timeout_s, every_s=0.5):
        return None
    return round(max(first_after().values()) - since, 2)
