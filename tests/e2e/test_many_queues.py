"""2,000 queues over two `sqsbalancerd run` processes (moto server): owned once, `status` quick.

The queues are empty and long polls last 20 s, so the emulator mostly waits; timings have
slack (heartbeat 5 s, timeout 20 s): 2,000 long polls (a thread each, on both sides) slow moto
down on a small box, and the table client's read timeout is a quarter of the heartbeat interval.

Opt-in (SQSB_SCALE_E2E=1): it has not passed yet. On the shared 2-core development box, with
other sessions' suites running (load average 15-175), the cluster settled (100-200 s) in 5 of
9 runs; status then answered correctly once, in 90.8 s against its 21 s bound, and otherwise
hit connect timeouts from the in-process moto server (which serves 2,000 long polls on
threads woken every second) or judged a live instance dead. Left out of the default run
until it is shown to pass on a quiet box.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest
from support import is_fixed_point, ownership_rows, wait_until

from sqsbalancerd.coordination.ring import capacity

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.environ.get("SQSB_SCALE_E2E") != "1", reason="2,000-queue scale test: SQSB_SCALE_E2E=1"
    ),
]

QUEUES = [f"many-{index:04d}" for index in range(2_000)]
# Every 40th queue has a dead-letter queue that also matches the pattern: never owned.
DEAD_LETTER = {name: f"{name}-dlq" for name in QUEUES[::40]}
TABLE = "sqsb-many"
INTERVAL_S = 5.0
# status reads the members twice, 1.25 heartbeats apart; the rest is the table and ListQueues
# (3 calls), with slack for a loaded box. Reading 2,050 queues' attributes took 26 s here.
STATUS_BOUND_S = INTERVAL_S * 1.25 + 15


def config(instance_id: str) -> str:
    return f"""
instance_id = "{instance_id}"
handler = "handlers:record"
[coordination]
table_name = "{TABLE}"
heartbeat_interval = {INTERVAL_S}
heartbeat_timeout = 20
rebalance_delay = 1
[discovery]
queue_pattern = "^many-"
[sqs]
wait_time_seconds = 20
[shutdown]
timeout = 5
[observability]
http_port = 0
log_format = "json"
"""


def create_queues(sqs: Any) -> None:
    arns = {}
    for name in DEAD_LETTER.values():
        url = sqs.create_queue(QueueName=name)["QueueUrl"]
        arns[name] = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
    for name in QUEUES:
        attributes = {}
        if name in DEAD_LETTER:
            policy = {"deadLetterTargetArn": arns[DEAD_LETTER[name]], "maxReceiveCount": "3"}
            attributes["RedrivePolicy"] = json.dumps(policy)
        sqs.create_queue(QueueName=name, Attributes=attributes)


def owners(dynamodb: Any) -> dict[str, str | None]:
    return {q: row.owner for q, row in ownership_rows(dynamodb, TABLE).items()}


@pytest.mark.timeout(480)
def test_two_thousand_queues_over_two_processes(sqs, dynamodb, daemons, tmp_path):
    started = time.monotonic()
    create_queues(sqs)
    created_s = time.monotonic() - started

    first, second = daemons.start(config=config("m1")), daemons.start(config=config("m2"))
    wait_until(
        lambda: is_fixed_point(owners(dynamodb), QUEUES, ["m1", "m2"]),
        timeout_s=300,
        every_s=1.0,
        what="2,000 queues settled over m1 and m2",
    )
    settled_s = time.monotonic() - started - created_s

    rows = owners(dynamodb)
    assert set(rows) == set(QUEUES)  # every queue has one row; no dead-letter queue has one
    shares = {name: list(rows.values()).count(name) for name in ("m1", "m2")}
    assert sum(shares.values()) == len(QUEUES)
    limit = capacity(queue_count=len(QUEUES), member_count=2, load_factor=1.10)
    assert max(shares.values()) <= limit, shares

    path = tmp_path / "status.toml"
    path.write_text(config("status-reader"))
    status_started = time.monotonic()
    result = daemons.run_cli("status", "--config", str(path), "--json", timeout_s=120)
    status_s = time.monotonic() - status_started
    assert result.stdout, result.stderr
    report = json.loads(result.stdout)
    assert result.returncode == 0, (report["instances"], report["warnings"][:5])
    assert {q["queue"]: q["owner"] for q in report["queues"]} == rows
    assert sorted(report["unclaimed"]) == sorted(DEAD_LETTER.values())
    assert {i["instance_id"]: i["alive"] for i in report["instances"]} == {"m1": True, "m2": True}
    assert report["all_owned"] is True
    assert status_s < STATUS_BOUND_S, f"status took {status_s:.1f} s"
    print(
        f"{len(QUEUES)} queues created in {created_s:.1f} s, settled over two processes in "
        f"{settled_s:.1f} s (shares {shares}); status --json in {status_s:.1f} s"
    )

    for daemon in (first, second):
        daemon.proc.send_signal(signal.SIGTERM)
    for daemon in (first, second):
        daemon.proc.send_signal(signal.SIGTERM)  # the second signal skips the poll waits
    assert [first.wait(timeout_s=60), second.wait(timeout_s=60)] == [0, 0]
    lines = [json.loads(line) for line in first.log().splitlines() if line.startswith("{")]
    [warning] = [line for line in lines if "no redrive policy" in line["msg"]]
    assert warning["count"] == len(QUEUES) - len(DEAD_LETTER)  # one line, not 1,950
