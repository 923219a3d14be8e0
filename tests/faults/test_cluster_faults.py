"""Coordination faults between real processes (issue 11, "Real processes too").

`sqsbalancerd run` subprocesses in dynamodb mode against the moto server, each reaching
DynamoDB (and, where a test says so, SQS) through its own fault proxy (proxy.py), so every
request of each instance is recorded with its wall-clock start and end. Assertions are
black-box: the table's rows, the proxies' records, the JSON log lines, the handler events
of tests/handlers.py and exit codes.
Timings: the suite's (heartbeat 1 s, timeout 4 s, delay 1 s, 1 s long polls).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from proxy import FaultProxy
from support import json_log, queue_depth, read_events, wait_until
from test_fencing import owners

pytestmark = pytest.mark.faults


def ok_ids(path: Any) -> set[str]:
    return {e["id"] for e in read_events(path) if e["event"] == "end" and e["outcome"] == "ok"}


def row_writes(proxy: FaultProxy, queue: str, *, after: float = 0.0) -> list[str]:
    """The ownership-row writes (acquire, release, delete) an instance sent for `queue`."""
    return [
        r.action
        for r in proxy.records("dynamodb")
        if r.key == f"queue#{queue}"
        and r.action in ("PutItem", "UpdateItem", "DeleteItem")
        and r.started >= after
    ]


def heartbeats(proxy: FaultProxy, instance_id: str, *, after: float = 0.0) -> int:
    return sum(
        1
        for r in proxy.records("dynamodb", "UpdateItem")
        if r.key == f"member#{instance_id}" and r.status == 200 and r.started >= after
    )


# -- a queue deleted while owned -------------------------------------------------------------


@pytest.mark.timeout(120)
def test_queue_deleted_while_owned_is_given_up_once_and_its_row_removed(
    sqs, dynamodb, daemons, proxies, fault_config
):
    """Real (moto): a queue deleted under its owner, in dynamodb mode. Discovery runs every
    120 s here, so the owner learns of the deletion only from its poller (QueueDoesNotExist),
    not from a refresh. It stops consuming that queue with one warning, removes the queue's
    ownership row, and does not take it again: over the next 8 heartbeats it writes that
    row no more (the defect: re-acquired and released every round until the next
    discovery). The other queues go on."""
    urls = {
        name: sqs.create_queue(QueueName=name)["QueueUrl"]
        for name in ("faults-del-a", "faults-del-b", "faults-del-c")
    }
    proxy = proxies.start("n1")
    config = fault_config(instance_id="n1").replace("interval = 1\n", "interval = 120\n")
    node = daemons.start(config=config, env=proxy.env(("dynamodb",)), name="n1")
    wait_until(
        lambda: set(owners(dynamodb)) == set(urls) and set(owners(dynamodb).values()) == {"n1"},
        timeout_s=30,
        every_s=0.1,
        what="n1 to own the three queues",
    )
    first = {sqs.send_message(QueueUrl=url, MessageBody="{}")["MessageId"] for url in urls.values()}
    wait_until(lambda: ok_ids(daemons.events_path) >= first, timeout_s=30, what="first handled")
    wait_until(
        lambda: queue_depth(sqs, urls["faults-del-b"]) == (0, 0),
        timeout_s=10,
        what="the deleted queue's deletes flushed first",
    )

    deleted = time.time()
    sqs.delete_queue(QueueUrl=urls["faults-del-b"])
    wait_until(
        lambda: "faults-del-b" not in owners(dynamodb),
        timeout_s=20,
        every_s=0.1,
        what="the deleted queue's row removed",
    )
    removed = time.time()
    # Eight rounds after that, as counted by n1's own heartbeats getting through.
    wait_until(
        lambda: heartbeats(proxy, "n1", after=removed) >= 8,
        timeout_s=30,
        every_s=0.2,
        what="eight heartbeats after the row's removal",
    )
    later = {
        sqs.send_message(QueueUrl=url, MessageBody="{}")["MessageId"]
        for name, url in urls.items()
        if name != "faults-del-b"
    }
    wait_until(lambda: ok_ids(daemons.events_path) >= later, timeout_s=30, what="others go on")
    rows_at_end = owners(dynamodb)
    node.terminate()
    assert node.wait(timeout_s=30) == 0, node.log()

    writes = row_writes(proxy, "faults-del-b", after=deleted)
    lines = json_log(node.log())
    consuming = [
        line
        for line in lines
        if line["msg"] == "consuming queue" and line.get("queue") == "faults-del-b"
    ]
    gone = [line for line in lines if line["msg"].startswith("queue no longer exists")]
    print(
        f"\nqueue deleted while owned (dynamodb mode): row removed {removed - deleted:.1f}s "
        f"after the deletion; writes of its row since: {writes}; consumed "
        f"{len(consuming)} time(s); {len(gone)} 'no longer exists' line(s)"
    )
    # One stop, one removal of the row, and nothing else: no acquire, no release loop.
    assert writes == ["DeleteItem"], writes
    assert len(consuming) == 1 and len(gone) == 1, (consuming, gone)
    assert rows_at_end == {"faults-del-a": "n1", "faults-del-c": "n1"}
    assert not [line for line in lines if line["level"] == "error"]
