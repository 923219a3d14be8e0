"""FIFO end to end: per-group order holds through a failure mid-group; groups run in parallel."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pytest
from support import queue_depth, read_events, wait_until

from sqsbalancerd.local import create_queues

pytestmark = pytest.mark.e2e

CONFIG = """
coordination.mode = "standalone"
handler = "handlers:record"
[discovery]
queue_pattern = "^work-"
interval = 1
[sqs]
wait_time_seconds = 1
[workers]
pool_size = 4
[retry]
base = 0
[observability]
http_port = 0
log_format = "json"
"""

GROUPS = ("g1", "g2", "g3")
PER_GROUP = 6
FAILING = ("g1", 2)  # g1's third message fails on its first delivery


def by_group(events: list[dict[str, Any]], kind: str) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:  # read_events sorts by time
        if event["event"] == kind:
            grouped[event["group"]].append(event)
    return grouped


def n_of(event: dict[str, Any]) -> int:
    return int(json.loads(event["body"])["n"])


def test_fifo_order_per_group_with_a_failure_mid_group(sqs, daemons):
    url = create_queues(sqs, ["work-f.fifo"])["work-f.fifo"]
    for n in range(PER_GROUP):
        for group in GROUPS:
            body = {"n": n, "g": group, "sleep": 0.2, "fail_once": (group, n) == FAILING}
            sqs.send_message(QueueUrl=url, MessageBody=json.dumps(body), MessageGroupId=group)
    daemon = daemons.start(config=CONFIG)

    def all_handled() -> bool:
        ends = by_group(read_events(daemons.events_path), "end")
        return sum(e["outcome"] == "ok" for g in ends.values() for e in g) >= 18

    wait_until(all_handled, timeout_s=60, what="18 messages handled")
    daemon.terminate()
    assert daemon.wait(timeout_s=30) == 0, daemon.log()

    events = read_events(daemons.events_path)
    starts, ends = by_group(events, "start"), by_group(events, "end")
    # Order, from the recorded start times: the failed one runs again before the next one.
    assert [n_of(e) for e in starts["g1"]] == [0, 1, 2, 2, 3, 4, 5]
    assert [n_of(e) for e in starts["g2"]] == list(range(PER_GROUP))
    assert [n_of(e) for e in starts["g3"]] == list(range(PER_GROUP))
    failed = [e for e in ends["g1"] if e["outcome"] == "failed"]
    assert [(n_of(e), e["receive_count"]) for e in failed] == [(2, 1)]
    retried = [e for e in ends["g1"] if n_of(e) == 2 and e["outcome"] == "ok"]
    # Retried in process: the same receive, a second attempt; g1's later messages were held.
    assert [(e["receive_count"], e["attempt"]) for e in retried] == [(1, 2)]
    assert {e["receive_count"] for e in starts["g1"]} == {1}

    # One message of a group at a time: each start comes after the previous end.
    for group in GROUPS:
        for end, start in zip(ends[group], starts[group][1:], strict=False):
            assert start["t"] >= end["t"], f"{group}: two messages ran at once"
    # Groups ran in parallel: some handling of one group overlapped another group's.
    intervals = [
        (group, s["t"], e["t"])
        for group in GROUPS
        for s, e in zip(starts[group], ends[group], strict=True)
    ]
    assert any(
        g1 != g2 and s1 < e2 and s2 < e1 for g1, s1, e1 in intervals for g2, s2, e2 in intervals
    ), "groups never ran concurrently"
    assert queue_depth(sqs, url) == (0, 0)
