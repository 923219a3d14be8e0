"""Scale and topology faults: a queue deleted while owned, 500 queues in one process, 1,500
queues discovered across ListQueues pages.

All real: moto really deletes the queue (ReceiveMessage then answers QueueDoesNotExist) and
really paginates ListQueues (MaxResults=1000 → a NextToken).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import psutil
import pytest
from support import queue_depth, read_events, wait_until
from totals import TOTALS

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


@pytest.mark.timeout(420)  # the waits below: 120 s listing + 180 s run + 60 s stop
def test_1500_queues_are_discovered_across_list_pages(sqs, daemons):
    names = [f"pg-{i:04d}" for i in range(DISCOVERED_QUEUES)]
    started = time.monotonic()
    urls = create(sqs, names)
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
    last = names[-1]
    message_id = sqs.send_message(QueueUrl=urls[last], MessageBody="{}")["MessageId"]
    print(
        f"\n1500 queues: created in {created_s:.1f}s; `sqsbalancerd queues` listed all 1500 "
        f"in {listed_s:.1f}s"
    )
    # And a run consumes the message on the last queue: every page's queues get a poller
    # (1500 in one process). 20 s long polls in the long mode, 5 s in the default run.
    started = time.monotonic()
    daemon = daemons.start(
        config=config(
            "^pg-",
            wait_s=20 if LONG else 5,
            extra=f"[workers]\nqueue_size = {DISCOVERED_QUEUES}\n",
        )
    )
    wait_until(
        lambda: message_id in ok_ids(daemons.events_path),
        timeout_s=300 if LONG else 180,  # ~40 s here; a loaded CI box gets the rest
        every_s=0.5,
        what="the last queue's message handled",
    )
    consumed_s = time.monotonic() - started
    daemon.terminate()
    assert daemon.wait(timeout_s=60) == 0, daemon.log()[-3000:]
    assert summary_of(daemon.log())["queues"] == DISCOVERED_QUEUES
    print(f"the last queue's message handled {consumed_s:.1f}s after start")
