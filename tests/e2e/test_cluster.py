"""Several `sqsbalancerd run` processes sharing 24 queues through DynamoDB (moto server).

Timings are fast (heartbeat 1 s, timeout 4 s, delay 1 s). Ownership is read from the table;
handling is read from the start/end events tests/handlers.py records per process.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import pytest
from support import is_fixed_point, ownership_rows, read_events, wait_until

pytestmark = pytest.mark.e2e

QUEUES = [f"work-{index:02d}" for index in range(24)]
APPLICATION_KEY = "app#sqsbalancer"
TABLE = "sqsb-e2e"
INTERVAL_S, TIMEOUT_S, DELAY_S = 1.0, 4.0, 1.0
# The README's bounds ("Timing bounds").
TAKEOVER_BOUND_S = TIMEOUT_S + DELAY_S + 2 * INTERVAL_S
HANDOFF_BOUND_S = DELAY_S + INTERVAL_S
# Bounds hold on the instances' clocks; on top: our polling of the rows, moto's latency and
# a loaded 2-core CI box (a takeover of 10.0 s against the 7 s bound was seen with other
# suites running). Asserted on the measured time; waits run longer, to report it.
SLACK_S = 3.5


def config(instance_id: str) -> str:
    return f"""
instance_id = "{instance_id}"
handler = "handlers:record"
[coordination]
mode = "dynamodb"
table_name = "{TABLE}"
heartbeat_interval = {INTERVAL_S}
heartbeat_timeout = {TIMEOUT_S}
rebalance_delay = {DELAY_S}
# The settled state checked is the count ring's fixed point (support.is_fixed_point).
balance = "count"
[discovery]
queue_pattern = "^work-"
interval = 1
[sqs]
wait_time_seconds = 1
[workers]
pool_size = 4
[shutdown]
timeout = 20
[retry]
base = 0
[observability]
http_port = 0
log_format = "json"
"""


@dataclass
class Traffic:
    """Messages sent so far (by SQS message id) to shallow queues, topped up as we go."""

    sqs: Any
    urls: dict[str, str]
    sent: dict[str, str] = field(default_factory=dict)  # message id -> queue

    def top_up(self, per_queue: int = 1, *, sleep_s: float = 0.3) -> None:
        body = json.dumps({"sleep": sleep_s})
        for queue, url in self.urls.items():
            entries = [{"Id": str(n), "MessageBody": body} for n in range(per_queue)]
            response = self.sqs.send_message_batch(QueueUrl=url, Entries=entries)
            assert not response.get("Failed")
            for entry in response["Successful"]:
                self.sent[entry["MessageId"]] = queue


def make_queues(sqs: Any) -> dict[str, str]:
    # A short visibility timeout, so the killed instance's in-flight messages come back soon.
    return {
        name: sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "5"})["QueueUrl"]
        for name in QUEUES
    }


def ownership(dynamodb: Any) -> dict[str, dict[str, Any]]:
    return {
        q: {"owner": row.owner, "lease": row.lease, "updated_at": row.updated_at}
        for q, row in ownership_rows(dynamodb, TABLE).items()
    }


def owners(dynamodb: Any) -> dict[str, str | None]:
    try:
        return {queue: row["owner"] for queue, row in ownership(dynamodb).items()}
    except dynamodb.exceptions.ResourceNotFoundException:
        return {}  # the first instance has not created the table yet


def member_ids(dynamodb: Any) -> set[str]:
    items = dynamodb.query(
        TableName=TABLE,
        KeyConditionExpression="pk = :pk AND begins_with(sk, :m)",
        ExpressionAttributeValues={":pk": {"S": APPLICATION_KEY}, ":m": {"S": "member#"}},
        ConsistentRead=True,
    )["Items"]
    return {item["instance_id"]["S"] for item in items}


def is_assigned_to(dynamodb: Any, live: list[str]) -> bool:
    """Settled: every queue owned by a live instance, nothing left for the ring to move."""
    return is_fixed_point(owners(dynamodb), QUEUES, live)


def handled_ok(events: list[dict[str, Any]]) -> Counter[str]:
    return Counter(e["id"] for e in events if e["event"] == "end" and e.get("outcome") == "ok")


def handling_intervals(
    events: list[dict[str, Any]], killed_at: dict[int, float]
) -> dict[str, list[tuple[float, float, int]]]:
    """queue -> [(start, end, pid)]; a handler cut short by SIGKILL ends at the kill."""
    open_starts: dict[tuple[int, str, int], dict[str, Any]] = {}
    by_queue: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for event in events:
        key = (event["pid"], event["id"], event["receive_count"])
        if event["event"] == "start":
            open_starts[key] = event
        elif key in open_starts:
            start = open_starts.pop(key)
            by_queue[event["queue"]].append((start["t"], event["t"], event["pid"]))
    for (pid, _, _), start in open_starts.items():
        assert pid in killed_at, f"handler never ended in live process {pid}: {start}"
        by_queue[start["queue"]].append((start["t"], killed_at[pid], pid))
    return by_queue


def assert_never_handled_by_two_at_once(
    events: list[dict[str, Any]], killed_at: dict[int, float]
) -> int:
    """Per queue, intervals of different processes never overlap; returns how many checked."""
    checked = 0
    for queue, intervals in handling_intervals(events, killed_at).items():
        latest_end: dict[int, float] = {}
        for start, end, pid in sorted(intervals):
            for other, other_end in latest_end.items():
                assert other == pid or other_end <= start, (
                    f"{queue}: pid {pid} started at {start:.3f} while pid {other} "
                    f"was handling until {other_end:.3f}"
                )
            latest_end[pid] = max(end, latest_end.get(pid, end))
            checked += 1
    return checked


def summary_of(log: str) -> dict[str, Any]:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("msg", "").startswith("stopped")][-1]


@dataclass
class Cluster:
    dynamodb: Any
    daemons: Any
    traffic: Traffic
    nodes: dict[str, Any] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    killed_at: dict[int, float] = field(default_factory=dict)

    def start(self, name: str) -> None:
        self.nodes[name] = self.daemons.start(config=config(name), name=name)
        self.pids[name] = self.nodes[name].proc.pid

    def wait_assigned(self, live: list[str], *, timeout_s: float, what: str) -> float:
        started = time.monotonic()
        wait_until(
            lambda: is_assigned_to(self.dynamodb, live), timeout_s=timeout_s, every_s=0.1, what=what
        )
        return time.monotonic() - started

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.daemons.events_path)


def spread_over_three(cluster: Cluster) -> None:
    for name in ("n1", "n2", "n3"):
        cluster.start(name)
    took_s = cluster.wait_assigned(["n1", "n2", "n3"], timeout_s=45, what="an even spread")
    counts = Counter(owners(cluster.dynamodb).values())
    print(f"\nspread over 3 after {took_s:.1f}s: {dict(sorted(counts.items()))}")
    assert max(counts.values()) <= math.ceil(1.1 * len(QUEUES) / 3)


def kill_while_busy(cluster: Cluster, name: str, survivors: set[str]) -> None:
    pid = cluster.pids[name]
    cluster.traffic.top_up(2)
    wait_until(
        lambda: any(
            e["pid"] == pid and e["event"] == "start" and e["t"] > time.time() - 1
            for e in cluster.events()
        ),
        timeout_s=20,
        what=f"{name} to be handling messages",
    )
    cluster.killed_at[pid] = killed_at = time.time()
    cluster.nodes[name].proc.send_signal(signal.SIGKILL)
    cluster.nodes[name].wait(timeout_s=10)
    wait_until(
        lambda: set(owners(cluster.dynamodb).values()) == survivors,
        timeout_s=3 * TAKEOVER_BOUND_S,
        every_s=0.05,
        what="survivors to own every queue",
    )
    takeover_s = time.time() - killed_at
    print(f"takeover after SIGKILL: {takeover_s:.2f}s (bound {TAKEOVER_BOUND_S:g}s)")
    assert takeover_s <= TAKEOVER_BOUND_S + SLACK_S
    assert is_assigned_to(cluster.dynamodb, sorted(survivors))
    wait_until(lambda: name not in member_ids(cluster.dynamodb), timeout_s=10, what="row gone")


def join(cluster: Cluster, name: str, live: list[str]) -> None:
    cluster.traffic.top_up(1)
    before = owners(cluster.dynamodb)
    cluster.start(name)
    took_s = cluster.wait_assigned(live, timeout_s=45, what="the newcomer to get its share")
    after = owners(cluster.dynamodb)
    moved = [q for q in QUEUES if before[q] != after[q]]
    to_newcomer = [q for q in moved if after[q] == name]
    print(f"join settled after {took_s:.1f}s: {len(moved)} moved, {len(to_newcomer)} to {name}")
    # The minimum: only the newcomer's share moves, all of it to the newcomer.
    assert moved == to_newcomer
    assert len(to_newcomer) >= len(QUEUES) // len(live)


def terminate_and_hand_over(cluster: Cluster, name: str, live: list[str]) -> None:
    cluster.traffic.top_up(1)
    theirs = {q for q, o in owners(cluster.dynamodb).items() if o == name}
    released_at: dict[str, float] = {}  # from the rows: the releaser's and acquirer's clocks
    acquired_at: dict[str, float] = {}

    def watch_handoff() -> bool:
        for queue, row in ownership(cluster.dynamodb).items():
            if queue not in theirs or queue in acquired_at:
                continue
            if row["owner"] is None:
                released_at.setdefault(queue, row["updated_at"])
            elif row["owner"] != name:
                acquired_at[queue] = row["updated_at"]
        return len(acquired_at) == len(theirs)

    terminated_at = time.time()
    cluster.nodes[name].terminate()
    wait_until(watch_handoff, timeout_s=30, every_s=0.01, what=f"{name}'s queues handed over")
    assert cluster.nodes[name].wait(timeout_s=30) == 0, cluster.nodes[name].log()
    handoffs = [acquired_at[q] - released_at[q] for q in released_at]
    print(
        f"SIGTERM: {len(theirs)} queues owned again within "
        f"{max(acquired_at.values()) - terminated_at:.2f}s of the signal; after their release "
        f"(seen for {len(handoffs)}): max {max(handoffs, default=0):.2f}s, mean "
        f"{sum(handoffs) / max(1, len(handoffs)):.2f}s (bound {HANDOFF_BOUND_S:g}s)"
    )
    # Rows are polled every ~10 ms and a handoff takes up to a heartbeat: a release and its
    # take-over can fall between two polls only rarely; most must be measured.
    assert len(theirs) >= 1 and len(handoffs) >= max(1, len(theirs) // 2), (theirs, handoffs)
    assert max(handoffs) <= HANDOFF_BOUND_S + SLACK_S
    cluster.wait_assigned(live, timeout_s=10, what="the survivors to share")
    assert name not in member_ids(cluster.dynamodb)


def check_handling(cluster: Cluster, killed: str) -> None:
    """Every message handled, never two processes on one queue at once; duplicates only
    for what the killed instance had received (mid-handler, or handled but not deleted)."""
    sent = set(cluster.traffic.sent)
    events = cluster.events()
    checked = assert_never_handled_by_two_at_once(events, cluster.killed_at)
    assert set(handled_ok(events)) == sent
    starts = Counter(e["id"] for e in events if e["event"] == "start")
    repeated = {message_id for message_id, n in starts.items() if n > 1}
    on_killed = [e for e in events if e["pid"] == cluster.pids[killed]]
    cut = {e["id"] for e in on_killed} - {e["id"] for e in on_killed if e["event"] == "end"}
    print(
        f"{len(sent)} messages sent, all handled; {checked} handlings checked for overlap; "
        f"{len(repeated)} handled twice, all by the SIGKILLed instance first "
        f"({len(cut & repeated)} cut mid-handler, {len(repeated - cut)} done but not deleted)"
    )
    assert repeated <= {e["id"] for e in on_killed}


def check_status_agrees(cluster: Cluster, live: set[str]) -> None:
    """`status --json` is one more observer: same owners as the rows, the same live set."""
    path = cluster.daemons.tmp_path / "status.toml"
    path.write_text(config("status-reader"))
    result = cluster.daemons.run_cli("status", "--config", str(path), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    rows = owners(cluster.dynamodb)
    assert {q["queue"]: q["owner"] for q in report["queues"]} == rows
    instances = {i["instance_id"]: i for i in report["instances"]}
    assert {name for name, i in instances.items() if i["alive"]} == live
    for name in live:
        assert sorted(instances[name]["queues"]) == sorted(q for q, o in rows.items() if o == name)


@pytest.mark.timeout(300)  # covers the waits below (45 + 20 + 27 + 45 + 30 + 30 + ... s)
def test_cluster_spreads_takes_over_shares_and_hands_over(sqs, dynamodb, daemons):
    cluster = Cluster(dynamodb, daemons, Traffic(sqs, make_queues(sqs)))
    cluster.traffic.top_up(2)

    spread_over_three(cluster)
    kill_while_busy(cluster, "n3", survivors={"n1", "n2"})
    join(cluster, "n4", live=["n1", "n2", "n4"])
    terminate_and_hand_over(cluster, "n1", live=["n2", "n4"])

    wait_until(
        lambda: set(cluster.traffic.sent) <= set(handled_ok(cluster.events())),
        timeout_s=30,
        every_s=0.2,
        what="every message handled",
    )
    check_status_agrees(cluster, live={"n2", "n4"})
    for name in ("n2", "n4"):
        cluster.nodes[name].terminate()
    for name in ("n2", "n4"):
        assert cluster.nodes[name].wait(timeout_s=30) == 0, cluster.nodes[name].log()
    check_handling(cluster, killed="n3")
    for name in ("n1", "n2", "n4"):
        print(f"{name}: aws_calls={summary_of(cluster.nodes[name].log())['aws_calls']}")
