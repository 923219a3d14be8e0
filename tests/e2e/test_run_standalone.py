"""`sqsbalancerd run` end to end: the installed CLI in a subprocess against a moto server."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from support import queue_depth, read_events, wait_until

from sqsbalancerd.local import create_queues, send_messages

pytestmark = pytest.mark.e2e

FAST = """
coordination.mode = "standalone"
handler = "handlers:record"
[discovery]
queue_pattern = "^work-"
interval = 1
[sqs]
wait_time_seconds = 1
[retry]
base = 0
[observability]
http_port = 0
log_format = "json"
"""


def handled_ok(events: list[dict[str, Any]]) -> Counter[str]:
    return Counter(e["id"] for e in events if e["event"] == "end" and e["outcome"] == "ok")


def test_three_queues_every_tenth_failing_once_all_handled_and_deleted(sqs, daemons):
    urls = create_queues(sqs, ["work-a", "work-b", "work-c"])
    for url in urls.values():
        bodies = [json.dumps({"n": n, "fail_once": n % 10 == 0}) for n in range(200)]
        send_messages(sqs, url, bodies)
    daemon = daemons.start(config=FAST)

    wait_until(
        lambda: len(handled_ok(read_events(daemons.events_path))) >= 600,
        timeout_s=90,
        what="600 messages handled",
    )
    daemon.terminate()
    assert daemon.wait(timeout_s=30) == 0, daemon.log()

    events = read_events(daemons.events_path)
    ok = handled_ok(events)
    assert len(ok) == 600
    failed = [e for e in events if e["event"] == "end" and e["outcome"] == "failed"]
    assert len(failed) == 60
    retried_ok = [
        e
        for e in events
        if e["event"] == "end" and e["outcome"] == "ok" and json.loads(e["body"])["fail_once"]
    ]
    assert {e["receive_count"] for e in retried_ok} == {2}
    for url in urls.values():
        assert queue_depth(sqs, url) == (0, 0)
    summary = [
        json.loads(line)
        for line in daemon.log().splitlines()
        if line.startswith("{") and '"stopped"' in line
    ][-1]
    assert summary["deleted"] == 600
    assert summary["failed"] == 60
