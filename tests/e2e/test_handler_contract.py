"""The handler contract through the installed CLI: what each batch answer deletes, FIFO with
a dead-letter queue, handler timeouts and a blocked event loop — counted per message id."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

import pytest
from support import queue_depth, read_events, wait_until

from sqsbalancerd.local import create_queues

pytestmark = pytest.mark.e2e

BASE = """
coordination.mode = "standalone"
handler = "{handler}"
[discovery]
queue_pattern = "^work-"
interval = 1
[sqs]
wait_time_seconds = 1
[workers]
pool_size = 4
{workers}
[retry]
base = 0
[observability]
http_port = 0
log_format = "json"
"""

ACCEPTED = ("batchresult", "ids", "messages", "mixed", "lambda")
ALL_SUCCEEDED = ("none", "lambdaempty")
REJECTED = (
    "foreignid",
    "foreignbatchresult",
    "emptyidentifier",
    "unknownidentifier",
    "nobatchitemfailures",
    "false",
    "number",
    "raisinggenerator",
)


def config(handler: str, workers: str = "") -> str:
    return BASE.format(handler=handler, workers=workers)


def log_lines(daemon: Any) -> list[dict[str, Any]]:
    lines = []
    for line in daemon.log().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def send_numbered(sqs: Any, url: str, count: int, **fields: Any) -> dict[str, int]:
    """Sends bodies {"n": 0..count-1, **fields} in one batch; returns message id -> n."""
    entries = [{"Id": str(n), "MessageBody": json.dumps({"n": n, **fields})} for n in range(count)]
    response = sqs.send_message_batch(QueueUrl=url, Entries=entries)
    return {r["MessageId"]: int(r["Id"]) for r in response["Successful"]}


@pytest.mark.timeout(180)
def test_every_batch_answer_deletes_exactly_what_it_says(sqs, daemons):
    shapes = ACCEPTED + ALL_SUCCEEDED + REJECTED
    urls = create_queues(sqs, [f"work-{shape}" for shape in shapes])
    sent = {shape: send_numbered(sqs, urls[f"work-{shape}"], 3) for shape in shapes}
    daemon = daemons.start(config=config("handlers:contract_batch"))

    def expected_runs(shape: str, n: int) -> int:
        if shape in REJECTED:
            return 2  # nothing deleted: every message comes back once
        return 2 if shape in ACCEPTED and n == 1 else 1

    total = sum(expected_runs(s, n) for s in shapes for n in range(3))

    def starts() -> list[dict[str, Any]]:
        return [e for e in read_events(daemons.events_path) if e["event"] == "start"]

    wait_until(lambda: len(starts()) >= total, timeout_s=120, what=f"{total} handler runs")
    wait_until(
        lambda: all(queue_depth(sqs, url) == (0, 0) for url in urls.values()),
        timeout_s=30,
        what="every queue empty",
    )
    daemon.terminate()
    assert daemon.wait(timeout_s=30) == 0, daemon.log()

    runs: dict[str, list[int]] = defaultdict(list)
    for event in starts():
        runs[event["id"]].append(event["receive_count"])
    for shape in shapes:
        for message_id, n in sent[shape].items():
            want = [1, 2] if expected_runs(shape, n) == 2 else [1]
            assert runs[message_id] == want, f"{shape}: message n={n} ran {runs[message_id]}"
    unreadable = [line for line in log_lines(daemon) if "answer unreadable" in line["msg"]]
    assert len(unreadable) == len(REJECTED), unreadable
    assert all(line.get("error") for line in unreadable)  # each names what came back


@pytest.mark.timeout(180)
def test_fifo_failure_keeps_group_order_and_only_the_failed_message_reaches_the_dlq(sqs, daemons):
    urls = create_queues(sqs, ["dead-letters.fifo"])
    dlq_arn = sqs.get_queue_attributes(
        QueueUrl=urls["dead-letters.fifo"], AttributeNames=["QueueArn"]
    )["Attributes"]["QueueArn"]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 3})
    url = sqs.create_queue(
        QueueName="work-orders.fifo",
        Attributes={"FifoQueue": "true", "RedrivePolicy": redrive, "VisibilityTimeout": "30"},
    )["QueueUrl"]
    ids: dict[tuple[str, int], str] = {}
    for group in ("g1", "g2"):
        for n in range(5):
            body = {"n": n, "fail_always": group == "g1" and n == 1}
            response = sqs.send_message(
                QueueUrl=url,
                MessageBody=json.dumps(body),
                MessageGroupId=group,
                MessageDeduplicationId=f"{group}-{n}",
            )
            ids[(group, n)] = response["MessageId"]
    daemon = daemons.start(config=config("handlers:record"))

    def dead() -> list[dict[str, Any]]:
        got = sqs.receive_message(
            QueueUrl=urls["dead-letters.fifo"], MaxNumberOfMessages=10, VisibilityTimeout=0
        )
        return got.get("Messages", [])

    def ok_ids() -> set[str]:
        return {e["id"] for e in read_events(daemons.events_path) if e.get("outcome") == "ok"}

    wait_until(lambda: len(ok_ids()) >= 9, timeout_s=120, what="9 messages handled")
    wait_until(dead, timeout_s=30, what="the failing message in the DLQ")
    daemon.terminate()
    assert daemon.wait(timeout_s=30) == 0, daemon.log()

    [dead_letter] = dead()
    assert json.loads(dead_letter["Body"]) == {"n": 1, "fail_always": True}
    starts = [e for e in read_events(daemons.events_path) if e["event"] == "start"]
    g1 = [
        (json.loads(e["body"])["n"], e["receive_count"], e["attempt"])
        for e in starts
        if e["group"] == "g1"
    ]
    # The failed message: three attempts in process (maxReceiveCount 3), then redriven
    # without running again; its group-mates ran after it, in order, exactly once each.
    assert g1[:4] == [(0, 1, 1), (1, 1, 1), (1, 1, 2), (1, 1, 3)]
    assert [n for n, _, _ in g1[4:]] == [2, 3, 4]
    assert all(receive_count <= 2 for _, receive_count, _ in g1)  # one release at most
    assert Counter(e["id"] for e in starts if e["group"] == "g2") == Counter(
        {ids[("g2", n)]: 1 for n in range(5)}
    )
    assert queue_depth(sqs, url) == (0, 0)


@pytest.mark.timeout(120)
def test_handler_timeouts_sync_released_at_once_async_cancelled(sqs, daemons):
    urls = create_queues(sqs, ["work-sync", "work-async"])
    sync_ids = send_numbered(sqs, urls["work-sync"], 2, hang_once=4)
    async_ids = send_numbered(sqs, urls["work-async"], 2, sleep=30)
    workers = "handler_timeout = 1.0"
    sync_daemon = daemons.start(
        "--queue-pattern", "^work-sync$", config=config("handlers:faults", workers), name="s"
    )
    async_daemon = daemons.start(
        "--queue-pattern", "^work-async$", config=config("handlers:sleepy_async", workers), name="a"
    )

    def ok() -> Counter[str]:
        return Counter(
            e["id"] for e in read_events(daemons.events_path) if e.get("outcome") == "ok"
        )

    everything = set(sync_ids) | set(async_ids)
    # Well inside the 30 s visibility timeout: released (sync) or failed (async) at once.
    wait_until(lambda: set(ok()) >= everything, timeout_s=25, what="every message handled")
    for daemon in (sync_daemon, async_daemon):
        daemon.terminate()
        assert daemon.wait(timeout_s=30) == 0, daemon.log()
    for url in urls.values():
        assert queue_depth(sqs, url) == (0, 0)
    sync_lines = [entry for entry in log_lines(sync_daemon) if "timed out" in entry["msg"]]
    async_lines = [
        entry for entry in log_lines(async_daemon) if "timed out; cancelled" in entry["msg"]
    ]
    assert {entry["message_id"] for entry in sync_lines} == set(sync_ids)
    assert {entry["message_id"] for entry in async_lines} == set(async_ids)
    assert all(entry["queue"] == "work-async" for entry in async_lines)


@pytest.mark.timeout(120)
def test_a_blocked_event_loop_is_reported_with_the_handler_path(sqs, daemons):
    urls = create_queues(sqs, ["work-block"])
    send_numbered(sqs, urls["work-block"], 1, block=2.5)
    daemon = daemons.start(config=config("handlers:sleepy_async"))
    wait_until(
        lambda: any(
            "blocking the handlers' event loop" in entry["msg"] for entry in log_lines(daemon)
        ),
        timeout_s=30,
        what="the blocked-loop line",
    )
    wait_until(lambda: queue_depth(sqs, urls["work-block"]) == (0, 0), timeout_s=30)
    daemon.terminate()
    assert daemon.wait(timeout_s=30) == 0, daemon.log()
    [line] = [
        entry for entry in log_lines(daemon) if "blocking the handlers' event loop" in entry["msg"]
    ]
    assert line["handler"] == "handlers:sleepy_async"
