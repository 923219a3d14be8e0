"""A hot FIFO queue shared by two instances (load-aware replicas) keeps per-group order.

SQS hands a message group to one receiver at a time, so a FIFO queue may have several
owners: each receives the groups nobody else holds. Two `sqsbalancerd run` processes in
load mode on one moto server; one FIFO queue carries every message (many groups, 100 ms
handler, fed round by round so it stays shallow), more than one instance's two workers can
keep up with, so the planner gives it a second owner. Checked from the recorded events:
both processes handled the queue at the same time (it was shared, not moved), every
message was handled once, and within each group the messages ran in order, one at a time,
across the two processes.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from typing import Any

import pytest
from support import queue_depth, read_events, wait_until

from sqsbalancerd.local import create_queues

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

HOT = "work-hot.fifo"
GROUPS = [f"g{index:02d}" for index in range(20)]
PER_GROUP = 24  # 24 s of handler time for one instance's two workers: time to split
HANDLER_S = 0.1
SHALLOW = 30  # messages visible in the queue before the next round is sent


def config(instance_id: str) -> str:
    return f"""
instance_id = "{instance_id}"
handler = "handlers:record"
[coordination]
mode = "dynamodb"
table_name = "sqsb-shared-fifo"
heartbeat_interval = 1
heartbeat_timeout = 4
rebalance_delay = 1
balance = "load"
# Five rounds an epoch (as bench.loadbalance_e2e): the clock member sees the others' summaries
# two or three rounds after its epoch turns. At two rounds it never saw an epoch complete,
# never planned, and never took the replica the other member planned for it (CI, once).
load_interval = 5
load_min_dwell = 10
[discovery]
queue_pattern = "^work-"
interval = 1
[sqs]
wait_time_seconds = 1
[workers]
pool_size = 2
[shutdown]
timeout = 20
[retry]
base = 0
[observability]
http_port = 0
log_format = "json"
"""


def _feed(sqs: Any, url: str) -> set[str]:
    """Send the groups' messages round by round, keeping the queue shallow (moto's receive
    slows with depth): the next round goes once fewer than SHALLOW wait to be received."""
    sent: set[str] = set()
    for n in range(PER_GROUP):
        wait_until(lambda: queue_depth(sqs, url)[0] < SHALLOW, timeout_s=60, what="room")
        for start in range(0, len(GROUPS), 10):
            entries = [
                {
                    "Id": group,
                    "MessageBody": json.dumps({"n": n, "g": group, "sleep": HANDLER_S}),
                    "MessageGroupId": group,
                    "MessageDeduplicationId": f"{group}-{n}",
                }
                for group in GROUPS[start : start + 10]
            ]
            answer = sqs.send_message_batch(QueueUrl=url, Entries=entries)
            assert not answer.get("Failed"), answer
            sent.update(entry["MessageId"] for entry in answer["Successful"])
    return sent


def _intervals(events: list[dict[str, Any]]) -> list[tuple[float, float, int, str, int]]:
    """(start, end, pid, group, n) of each handling of the hot queue, by start time."""
    starts: dict[tuple[int, str, int], float] = {}
    found = []
    for event in events:
        if event["queue"] != HOT:
            continue
        key = (event["pid"], event["id"], event["attempt"])
        if event["event"] == "start":
            starts[key] = event["t"]
        elif key in starts:
            n = int(json.loads(event["body"])["n"])
            found.append((starts.pop(key), event["t"], event["pid"], event["group"], n))
    return sorted(found)


def _shared_for_s(intervals: list[tuple[float, float, int, str, int]]) -> float:
    """Seconds during which both processes were handling messages of the queue at once."""
    by_pid: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for start, end, pid, _, _ in intervals:
        by_pid[pid].append((start, end))
    if len(by_pid) < 2:
        return 0.0
    first, second = list(by_pid.values())[:2]
    return sum(
        max(0.0, min(a_end, b_end) - max(a_start, b_start))
        for a_start, a_end in first
        for b_start, b_end in second
    )


def test_a_hot_fifo_queue_shared_by_two_owners_keeps_each_group_in_order(sqs, daemons):
    urls = create_queues(sqs, [HOT, "work-idle-a", "work-idle-b"])
    nodes = [daemons.start(config=config(name), name=name) for name in ("n1", "n2")]
    for node in nodes:  # both members before the load appears: the split is the planner's
        wait_until(lambda n=node: "joined the cluster" in n.log(), timeout_s=60, what="a join")
    sent = _feed(sqs, urls[HOT])

    def handled() -> set[str]:
        events = read_events(daemons.events_path)
        return {e["id"] for e in events if e["event"] == "end" and e["outcome"] == "ok"}

    wait_until(lambda: handled() >= sent, timeout_s=150, every_s=0.5, what="every message")
    for node in nodes:
        node.terminate()
    for node in nodes:
        assert node.wait(timeout_s=40) == 0, node.log()

    events = read_events(daemons.events_path)
    intervals = _intervals(events)
    ok = [e["id"] for e in events if e["event"] == "end" and e["outcome"] == "ok"]
    assert set(ok) == sent and len(ok) == len(sent), "each message handled once"
    # Shared, not just moved: the two owners handled the queue side by side for a while.
    shared_s = _shared_for_s(intervals)
    print(f"both owners handled {HOT} at once for {shared_s:.1f} handler-seconds")
    assert shared_s >= 1.0, "the hot queue never had two owners at once"
    for group in GROUPS:
        runs = [i for i in intervals if i[3] == group]
        assert [n for *_, n in runs] == list(range(PER_GROUP)), f"{group} out of order"
        for before, after in itertools.pairwise(runs):
            assert after[0] >= before[1], f"{group}: {after} started before {before} ended"
