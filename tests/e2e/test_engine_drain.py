"""Graceful drain end to end: real SIGTERMs sent to `sqsbalancerd run` subprocesses."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest
from support import json_log, queue_depth, read_events, wait_until

from sqsbalancerd.local import create_queues, send_messages

pytestmark = pytest.mark.e2e


def config(*, pool_size: int = 2, wait_s: int = 1, shutdown_s: float = 30) -> str:
    return f"""
coordination.mode = "standalone"
handler = "handlers:record"
[discovery]
queue_pattern = "^work-"
interval = 1
[sqs]
wait_time_seconds = {wait_s}
[workers]
pool_size = {pool_size}
queue_size = 10
[shutdown]
timeout = {shutdown_s}
[retry]
base = 0
[observability]
http_port = 0
log_format = "json"
"""


def events_of(daemons: Any, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_events(daemons.events_path) if e["event"] == kind]


def last_line(daemon: Any) -> dict[str, Any]:
    return [line for line in json_log(daemon.log()) if line["msg"].startswith("stopped")][-1]


def has_log(daemon: Any, message: str) -> bool:
    return any(line["msg"] == message for line in json_log(daemon.log()))


def sleepers(seconds: float, count: int) -> list[str]:
    return [json.dumps({"n": n, "sleep": seconds}) for n in range(count)]


def test_sigterm_lets_running_handlers_finish_and_releases_the_rest_at_once(sqs, daemons):
    url = create_queues(sqs, ["work-a"])["work-a"]
    send_messages(sqs, url, sleepers(6.0, 8))
    daemon = daemons.start(config=config(pool_size=2))
    wait_until(
        lambda: len(events_of(daemons, "start")) == 2, timeout_s=30, what="two handlers running"
    )
    wait_until(
        lambda: queue_depth(sqs, url) == (0, 8),
        timeout_s=10,
        what="all 8 received (2 running, 6 waiting in memory)",
    )

    daemon.proc.send_signal(signal.SIGTERM)
    signalled_at = time.time()
    # Released at once: visible again while the two handlers are still sleeping.
    wait_until(
        lambda: queue_depth(sqs, url) == (6, 2),
        timeout_s=3,
        what="the 6 unstarted messages visible again",
    )
    assert not events_of(daemons, "end"), "released only after the handlers ended"

    assert daemon.wait(timeout_s=30) == 0, daemon.log()
    assert time.time() - signalled_at < 20
    assert queue_depth(sqs, url) == (6, 0)  # the two finished ones were deleted
    starts = events_of(daemons, "start")
    assert len(starts) == 2
    assert all(e["t"] < signalled_at for e in starts), "a handler started after SIGTERM"
    assert [e["outcome"] for e in events_of(daemons, "end")] == ["ok", "ok"]
    summary = last_line(daemon)
    assert (summary["deleted"], summary["released"], summary["exit_code"]) == (2, 6, 0)


def test_sigterm_during_idle_long_polls_leaves_arriving_messages_visible(sqs, daemons):
    url = create_queues(sqs, ["work-a"])["work-a"]
    daemon = daemons.start(config=config(wait_s=20))
    send_messages(sqs, url, ["warm-up"])
    # Once it is handled the poller is straight back in a 20 s long poll.
    wait_until(lambda: events_of(daemons, "end"), timeout_s=30, what="the warm-up handled")

    daemon.proc.send_signal(signal.SIGTERM)
    signalled_at = time.time()
    send_messages(sqs, url, ["late-1", "late-2", "late-3"])  # they arrive during the poll

    assert daemon.wait(timeout_s=40) == 0, daemon.log()
    assert time.time() - signalled_at < 25 + 5
    assert queue_depth(sqs, url) == (3, 0)  # visible, not stuck invisible
    assert [e["body"] for e in events_of(daemons, "start")] == ["warm-up"]


def test_a_second_sigterm_skips_the_waits_and_deletes_nothing_unfinished(sqs, daemons):
    url = create_queues(sqs, ["work-a"])["work-a"]
    send_messages(sqs, url, sleepers(60.0, 1))
    daemon = daemons.start(config=config(shutdown_s=120))
    wait_until(lambda: events_of(daemons, "start"), timeout_s=30, what="the handler running")

    daemon.proc.send_signal(signal.SIGTERM)
    wait_until(
        lambda: has_log(daemon, "stop requested; draining"), timeout_s=10, what="the drain to begin"
    )
    daemon.proc.send_signal(signal.SIGTERM)
    forced_at = time.time()

    assert daemon.wait(timeout_s=30) == 1, daemon.log()
    assert time.time() - forced_at < 15
    assert not events_of(daemons, "end")
    assert queue_depth(sqs, url) == (1, 0)  # not deleted, and released at once
    summary = last_line(daemon)
    assert summary["forced"] is True
    assert summary["deleted"] == 0


def test_handlers_past_the_shutdown_timeout_exit_one_without_deleting(sqs, daemons):
    url = create_queues(sqs, ["work-a"])["work-a"]
    send_messages(sqs, url, sleepers(60.0, 2))
    daemon = daemons.start(config=config(pool_size=2, shutdown_s=2))
    wait_until(
        lambda: len(events_of(daemons, "start")) == 2, timeout_s=30, what="both handlers running"
    )

    daemon.proc.send_signal(signal.SIGTERM)
    signalled_at = time.time()

    assert daemon.wait(timeout_s=30) == 1, daemon.log()
    assert time.time() - signalled_at < 2 + 12
    assert queue_depth(sqs, url) == (2, 0)  # not deleted, and released at once
    summary = last_line(daemon)
    assert (summary["abandoned"], summary["deleted"], summary["exit_code"]) == (2, 0, 1)
