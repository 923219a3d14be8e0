"""2,000 queues over two `sqsbalancerd run` processes (moto server): owned once, `status` quick.

The queues are empty and long polls last 20 s, so the emulator mostly waits. It gets its own
process here, not the session's in-process server: moto serves each long poll on a thread
woken every second, and 2,000 of them made every other request crawl (status took 90.8 s;
one ownership read of 2,000 rows, 1-2 s on an idle server, took 90-100 s:
bench/status_long_polls.py, figures in docs/benchmarks.md). The cause is the interpreter's
GIL hand-off, forced every 5 ms while 2,000 threads keep waking: the emulator's process
switches every 100 ms instead (`sys.setswitchinterval`; moto's code is unchanged), which
brings that read back to ~5 s.
Timings have slack: heartbeat 5 s, timeout 30 s, and a fence margin of 20 s so that the
table client's read timeout (a quarter of the margin, at most 5 s) outlasts such a read.

Opt-in (SQSB_SCALE_E2E=1): 3-6 minutes. On the shared 2-core box at load averages of 20-185
(other sessions' suites) it ran five times after these changes. Twice the cluster settled
(once in 65.9 s): the first time status called m1 dead (one late renewal; status now judges
as the cluster does), the second time status was right in every respect but took 61.4 s
against its 21.25 s bound (where those seconds went is not yet measured). Three times the
cluster did not settle in 300 s, the coordinators' ownership reads timing out at 5 s (theirs, not
status's: see docs/benchmarks.md). It has not passed yet.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support import is_fixed_point, ownership_rows, wait_until

from sqsbalancerd.coordination.ring import capacity
from sqsbalancerd.local import DUMMY_ENV, LOOPBACK, free_port

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
# status reads the members twice, 1.25 heartbeats apart; the rest is the table, ListQueues
# (3 calls) and one ListDeadLetterSourceQueues per dead-letter queue (50), with slack for a
# loaded box. Reading 2,050 queues' attributes took 26 s here.
STATUS_BOUND_S = INTERVAL_S * 1.25 + 15


def config(instance_id: str) -> str:
    return f"""
instance_id = "{instance_id}"
handler = "handlers:record"
[coordination]
table_name = "{TABLE}"
heartbeat_interval = {INTERVAL_S}
heartbeat_timeout = 30
fence_margin = 20
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


# A GIL hand-off every 100 ms, not 5: see the module docstring.
_EMULATOR = (
    "import sys; sys.setswitchinterval(0.1); from moto.server import main; "
    "main(['-H', sys.argv[1], '-p', sys.argv[2]])"
)


@pytest.fixture(scope="module")
def scale_emulator() -> Iterator[str]:
    """moto's server in a process of its own, for this module only."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _EMULATOR, LOOPBACK, str(port)],
        env={**os.environ, **DUMMY_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _accepts(port), timeout_s=60, every_s=0.2, what="the emulator")
        yield f"http://{LOOPBACK}:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def endpoint(scale_emulator: str) -> str:
    """Overrides the session emulator's: every fixture of this module talks to this one."""
    return scale_emulator


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
        every_s=5.0,  # each look is a 2,000-row read: not every second
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
    print(f"settled in {settled_s:.1f} s, status --json in {status_s:.1f} s")
    assert result.stdout, result.stderr
    report = json.loads(result.stdout)
    assert result.returncode == 0, (report["instances"], report["warnings"][:5])
    assert {q["queue"]: q["owner"] for q in report["queues"]} == rows
    # Dead-letter queues are named as such (one ListDeadLetterSourceQueues each), not unclaimed.
    assert sorted(report["dead_letter"]) == sorted(DEAD_LETTER.values())
    assert report["unclaimed"] == []
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
