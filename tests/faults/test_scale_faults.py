"""Scale and topology faults: a queue deleted while owned, 500 queues in one process, 1,500
queues discovered across ListQueues pages.

All real: moto really deletes the queue (ReceiveMessage then answers QueueDoesNotExist) and
really paginates ListQueues (MaxResults=1000 → a NextToken).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import psutil
import pytest
from support import is_fixed_point, ownership_rows, queue_depth, read_events, wait_until
from totals import TOTALS

from sqsbalancerd.coordination.ring import capacity

pytestmark = pytest.mark.faults

LONG = TOTALS.is_long
MANY_QUEUES = TOTALS.many_queues
DISCOVERED_QUEUES = TOTALS.discovered_queues


def config(pattern: str, *, wait_s: int = 1, interval_s: float = 300, extra: str = "") -> str:
    return f"""
handler = "handlers:record"
coordination.mode = "standalone"
[discovery]
queue_pattern = "{pattern}"
interval = {interval_s}
[sqs]
wait_time_seconds = {wait_s}
[retry]
base = 0
[observability]
http_port = 0
log_format = "json"
{extra}
"""


def json_lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def summary_of(log: str) -> dict[str, Any]:
    return [line for line in json_lines(log) if line.get("msg", "").startswith("stopped")][-1]


def ok_ids(path: Any) -> set[str]:
    return {e["id"] for e in read_events(path) if e["event"] == "end" and e["outcome"] == "ok"}


def send_each(sqs: Any, urls: dict[str, str], count: int) -> set[str]:
    ids: set[str] = set()
    for url in urls.values():
        entries = [{"Id": str(n), "MessageBody": "{}"} for n in range(count)]
        ids |= {
            m["MessageId"]
            for m in sqs.send_message_batch(QueueUrl=url, Entries=entries)["Successful"]
        }
    return ids


def create(sqs: Any, names: list[str]) -> dict[str, str]:
    return {n: sqs.create_queue(QueueName=n)["QueueUrl"] for n in names}


@pytest.mark.timeout(90)
def test_queue_deleted_while_owned_stops_its_poller_with_one_warning(sqs, daemons):
    urls = create(sqs, ["del-a", "del-b", "del-c"])
    first = send_each(sqs, urls, 5)
    daemon = daemons.start(config=config("^del-"))
    wait_until(
        lambda: ok_ids(daemons.events_path) >= first,
        timeout_s=30,
        what="the first messages handled",
    )
    wait_until(
        lambda: queue_depth(sqs, urls["del-b"]) == (0, 0),
        timeout_s=10,
        what="del-b's deletes flushed",
    )
    sqs.delete_queue(QueueUrl=urls["del-b"])
    deleted_at = time.monotonic()
    wait_until(
        lambda: any(
            line["msg"].startswith("queue no longer exists") for line in json_lines(daemon.log())
        ),
        timeout_s=20,
        what="the poller to notice",
    )
    noticed_s = time.monotonic() - deleted_at
    later = send_each(sqs, {k: v for k, v in urls.items() if k != "del-b"}, 5)
    wait_until(
        lambda: ok_ids(daemons.events_path) >= later, timeout_s=30, what="the other queues to go on"
    )
    daemon.terminate()
    assert daemon.wait(timeout_s=30) == 0, daemon.log()

    lines = json_lines(daemon.log())
    about_b = [
        line
        for line in lines
        if line.get("queue") == "del-b"
        and line["level"] in ("warning", "error")
        and "redrive" not in line["msg"]
    ]
    assert [line["msg"] for line in about_b] == ["queue no longer exists; stopping its poller"], (
        about_b
    )
    assert not [line for line in lines if line["level"] == "error"]
    assert not [line for line in lines if "crashed" in line["msg"]]
    print(
        f"\nqueue deleted while owned: poller stopped {noticed_s:.1f}s later with one "
        f"warning; {len(later)} later messages on the other two handled"
    )


@pytest.mark.timeout(180)
def test_500_queues_in_one_process(sqs, daemons):
    """One message on each of 500 queues, one standalone process with the default pool and
    prefetch bound (10 + 100: at most 110 of the 500 long polls hold room at once, so the
    queues take turns). Long polls of 5 s (20 s in the long mode)."""
    names = [f"many-{i:03d}" for i in range(MANY_QUEUES)]
    started = time.monotonic()
    urls = create(sqs, names)
    sent = send_each(sqs, urls, 1)
    created_s = time.monotonic() - started
    daemon = daemons.start(config=config("^many-", wait_s=20 if LONG else 5))
    started = time.monotonic()
    wait_until(
        lambda: ok_ids(daemons.events_path) >= sent,
        timeout_s=120,
        every_s=0.5,
        what="a message handled on each of 500 queues",
    )
    consumed_s = time.monotonic() - started
    process = psutil.Process(daemon.proc.pid)
    rss_mib = process.memory_info().rss / 2**20
    threads = process.num_threads()
    daemon.terminate()
    assert daemon.wait(timeout_s=60) == 0, daemon.log()[-3000:]
    stop_s = time.monotonic() - started - consumed_s
    summary = summary_of(daemon.log())
    assert summary["deleted"] == MANY_QUEUES and summary["queues"] == MANY_QUEUES
    lines = json_lines(daemon.log())
    consumed = {line["queue"] for line in lines if line["msg"] == "consuming queue"}
    assert consumed == set(names)
    assert not [line for line in lines if line["level"] == "error"]
    pool_full = [line for line in lines if line["msg"].startswith("Connection pool is full")]
    print(
        f"\n500 queues: created + fed in {created_s:.1f}s; all 500 messages handled "
        f"{consumed_s:.1f}s after start; RSS {rss_mib:.0f} MiB, {threads} threads; "
        f"SIGTERM → exit 0 in {stop_s:.1f}s; {summary['aws_calls']} AWS calls; "
        f"{len(pool_full)} urllib3 'connection pool is full' warnings"
    )


@pytest.mark.timeout(240)  # creating 1500 queues, then 120 s of listing
def test_1500_queues_are_discovered_across_list_pages(sqs, daemons):
    names = [f"pg-{i:04d}" for i in range(DISCOVERED_QUEUES)]
    started = time.monotonic()
    create(sqs, names)
    created_s = time.monotonic() - started
    # moto pages ListQueues when MaxResults is given: the first page alone has 1000.
    first_page = sqs.list_queues(QueueNamePrefix="pg-", MaxResults=1000)
    assert len(first_page["QueueUrls"]) == 1000 and first_page.get("NextToken")

    started = time.monotonic()
    result = daemons.run_cli(
        "queues", "--queue-pattern", "^pg-", env={"COLUMNS": "200"}, timeout_s=120
    )
    listed_s = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    listed = set(re.findall(r"\bpg-\d{4}\b", result.stdout))
    assert listed == set(names)
    assert f"{DISCOVERED_QUEUES} consumed" in result.stdout
    print(
        f"\n1500 queues: created in {created_s:.1f}s; `sqsbalancerd queues` listed all 1500 "
        f"in {listed_s:.1f}s"
    )


# Long mode only: 1500 pollers in one process load the test process's moto server (stock
# moto wakes every waiting poll each second) to the edge on 2 cores. In the default run
# 1 of 4 runs here drained past 60 s after SIGTERM and 1 of 4 (beside a bench) did not
# handle the message within 180 s, with 5 s polls; with 20 s polls one run never handled
# it. What the emulator cannot serve is not the daemon's to prove here.
@pytest.mark.skipif(not LONG, reason="1500 pollers in one process: SQSB_FAULTS_LONG=1")
@pytest.mark.timeout(600)  # creating 1500 queues, 300 s run, 60 s stop
def test_1500_queues_are_all_consumed_by_one_process(sqs, daemons):
    names = [f"pg-{i:04d}" for i in range(DISCOVERED_QUEUES)]
    urls = create(sqs, names)
    message_id = sqs.send_message(QueueUrl=urls[names[-1]], MessageBody="{}")["MessageId"]
    # Every page's queues get a poller (1500 in one process), the last one included.
    started = time.monotonic()
    daemon = daemons.start(
        config=config("^pg-", wait_s=20, extra=f"[workers]\nqueue_size = {DISCOVERED_QUEUES}\n")
    )
    wait_until(
        lambda: message_id in ok_ids(daemons.events_path),
        timeout_s=300,
        every_s=0.5,
        what="the last queue's message handled",
    )
    consumed_s = time.monotonic() - started
    daemon.terminate()
    assert daemon.wait(timeout_s=60) == 0, daemon.log()[-3000:]
    assert summary_of(daemon.log())["queues"] == DISCOVERED_QUEUES
    print(f"the last queue's message handled {consumed_s:.1f}s after start")


# -- 1,000 queues over three processes (opt-in) ----------------------------------------------

SCALE_QUEUES = [f"kq-{i:04d}" for i in range(1_000)]
SCALE_TABLE = "sqsb-scale"
SCALE_INTERVAL_S = 5.0
SCALE_WINDOW_S = 60.0  # steady state is measured over this window


def scale_config(instance_id: str) -> str:
    return f"""
instance_id = "{instance_id}"
handler = "handlers:record"
[coordination]
table_name = "{SCALE_TABLE}"
heartbeat_interval = {SCALE_INTERVAL_S}
heartbeat_timeout = 30
fence_margin = 10
rebalance_delay = 1
# The settled state checked is the count ring's fixed point (support.is_fixed_point).
balance = "count"
[discovery]
queue_pattern = "^kq-"
[sqs]
wait_time_seconds = 20
[shutdown]
timeout = 5
[observability]
http_port = 0
log_format = "json"
"""


def table_owners(dynamodb: Any, table: str) -> dict[str, str | None]:
    return {queue: row.owner for queue, row in ownership_rows(dynamodb, table).items()}


def consuming_now(log: str) -> set[str]:
    """Queues a process consumes according to its log: last said "consuming", not since
    "releasing"."""
    now: set[str] = set()
    for line in json_lines(log):
        if line.get("msg") == "consuming queue":
            now.add(line["queue"])
        elif line.get("msg") == "releasing queue":
            now.discard(line["queue"])
    return now


def per_minute(proxy: Any, start: float, end: float) -> dict[str, float]:
    counts: dict[str, int] = {}
    for record in proxy.records("dynamodb"):
        if start <= record.started < end:
            counts[record.action] = counts.get(record.action, 0) + 1
    return {action: round(n * 60 / (end - start), 1) for action, n in sorted(counts.items())}


@pytest.mark.skipif(
    os.environ.get("SQSB_SCALE_E2E") != "1", reason="1,000 queues x 3 processes: SQSB_SCALE_E2E=1"
)
@pytest.mark.timeout(600)
def test_1000_queues_over_three_processes_owned_once_with_dynamodb_requests_counted(
    sqs, dynamodb, daemons, proxies
):
    """1,000 empty queues (moto slows with depth), three processes (heartbeat 5 s, timeout
    30 s, fence_margin 10 s so the table client's read timeout is 2.5 s: a read of 1,000 rows
    from a loaded moto took longer than 1.25 s, and fenced instances could not verify their
    rows to resume; 20 s long polls), each reaching DynamoDB through its own proxy, which counts its
    requests per action. Every queue ends with exactly one row naming a live member, within
    the ring's capacity, and each process consumes exactly the queues its rows say (from
    its log). Then a minute of steady state: no ownership row written, and per instance per
    minute one heartbeat and one member read per interval plus a sweep's row read every six
    (12 + 12 + 2 at 5 s; asserted with slack: at most 40 requests).

    Opt-in (SQSB_SCALE_E2E=1; ~4.5 min). Measured once here (load average in the thousands
    from other sessions): settled 74 s after launch, shares 333/334/333; steady per instance
    per minute: Query 18-19, UpdateItem 12-13.5 (~31 requests); while settling: PutItem ~270
    and UpdateItem (heartbeats) only 2.4-3.2 — the acquires of one round delay its heartbeat
    (issue 11, defect 7: heartbeats not yet on their own timer). Two earlier runs with a 20 s
    timeout and 5 s margin did not settle: the table client's 1.25 s read timeout was too
    short for a loaded moto, fenced instances could not verify their rows."""
    started = time.monotonic()
    for name in SCALE_QUEUES:
        sqs.create_queue(QueueName=name)
    created_s = time.monotonic() - started
    names = ("s1", "s2", "s3")
    proxy = {name: proxies.start(name) for name in names}
    nodes = {
        name: daemons.start(
            config=scale_config(name), env=proxy[name].env(("dynamodb",)), name=name
        )
        for name in names
    }
    launched = time.time()
    try:
        wait_until(
            lambda: is_fixed_point(table_owners(dynamodb, SCALE_TABLE), SCALE_QUEUES, names),
            timeout_s=300,
            every_s=2.0,
            what="1,000 queues settled over three processes",
        )
    except AssertionError as exc:  # say how far it got and what it cost
        now, rows = time.time(), table_owners(dynamodb, SCALE_TABLE)
        counts = {name: per_minute(proxy[name], launched, now) for name in names}
        raise AssertionError(
            f"{exc}; {len(rows)} rows, shares "
            f"{ {n: list(rows.values()).count(n) for n in names} }; DynamoDB requests per "
            f"instance per minute so far: {counts}"
        ) from None
    settled = time.time()
    window_start = settled + 2 * SCALE_INTERVAL_S  # the last handoff's rounds end
    rounds = int(SCALE_WINDOW_S / SCALE_INTERVAL_S)
    wait_until(  # a minute of steady state, as counted by every instance's own heartbeats
        lambda: all(
            sum(
                1
                for r in proxy[name].records("dynamodb", "UpdateItem")
                if r.key == f"member#{name}" and r.status == 200 and r.started >= window_start
            )
            >= rounds
            for name in names
        ),
        timeout_s=SCALE_WINDOW_S + 60,
        every_s=1.0,
        what="a minute of steady state",
    )
    window_end = time.time()
    rows = table_owners(dynamodb, SCALE_TABLE)
    consumed = {name: consuming_now(node.log()) for name, node in nodes.items()}
    for node in nodes.values():
        node.terminate()  # a drain awaits the 20 s polls in flight: exit 0 within ~30 s
    codes = {name: node.wait(timeout_s=90) for name, node in nodes.items()}

    shares = {name: sum(1 for owner in rows.values() if owner == name) for name in names}
    steady = {name: per_minute(proxy[name], window_start, window_end) for name in names}
    settling = {name: per_minute(proxy[name], launched, settled) for name in names}
    writes_in_window = [
        (name, r.action, r.key)
        for name in names
        for r in proxy[name].records("dynamodb")
        if window_start <= r.started < window_end
        and (r.key or "").startswith("queue#")
        and r.action in ("PutItem", "UpdateItem", "DeleteItem")
    ]
    print(
        f"\n1,000 queues x 3 processes: created in {created_s:.0f}s; settled "
        f"{settled - launched:.0f}s after launch, shares {shares}\n"
        f"  DynamoDB requests per instance per minute, steady ({window_end - window_start:.0f}s "
        f"window): {steady}\n"
        f"  while settling ({settled - launched:.0f}s): {settling}"
    )
    assert codes == dict.fromkeys(names, 0), codes
    assert set(rows) == set(SCALE_QUEUES) and sum(shares.values()) == len(SCALE_QUEUES)
    assert max(shares.values()) <= capacity(queue_count=1_000, member_count=3, load_factor=1.1)
    assert {name: consumed[name] for name in names} == {
        name: {q for q, owner in rows.items() if owner == name} for name in names
    }
    assert not writes_in_window, writes_in_window[:5]
    for name, counts in steady.items():
        assert sum(counts.values()) <= 40, (name, counts)
