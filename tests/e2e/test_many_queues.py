"""2,000 queues over two `sqsbalancerd run` processes (moto server): owned once, `status` quick.

The queues are empty and long polls last 20 s. The emulator is the bench's
(`python -m bench.emulator --scale`, in a process of its own), which changes moto's speed,
not its answers:

- an empty queue's long poll sleeps until a send or its end (bench.moto_patch
  `quiet_long_polls`). Stock moto wakes each poll every second: 2,000 of them kept every
  other request waiting (an ownership read of 2,000 rows, 1 s idle, took 90-100 s; `status`
  61-91 s against its 21 s bound; bench/status_long_polls.py, docs/benchmarks.md);
- DynamoDB pages are cut at 16 KB (moto serialises a 1 MB page in seconds).

SQS and DynamoDB are served by two such processes (botocore's AWS_ENDPOINT_URL_DYNAMODB),
as AWS serves them apart: on one, the coordinators' conditional writes wait behind 100
receives a second, which a loaded box did not serve within 300 s.

What is the daemon's, not the emulator's, is counted by the emulator per access key (one per
process): `status` makes 3 ListQueues and one ListDeadLetterSourceQueues per dead-letter
queue, no GetQueueAttributes, whatever the emulator's speed; its time is bounded, with
slack for a shared 2-core machine. Timings have slack too: heartbeat 5 s, a fence margin
of 20 s (the table client's read timeout is a quarter of it, at most 5 s) and a timeout of
60 s, so that the receive budget (timeout - margin: 40 s) never cuts a 20 s long poll.
On a quiet 2-core box it settles in about 21 s and passes in 50 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from support import is_fixed_point, ownership_rows, wait_until

from sqsbalancerd.coordination.ring import capacity
from sqsbalancerd.local import DUMMY_ENV, LOOPBACK

pytestmark = pytest.mark.e2e

QUEUES = [f"many-{index:04d}" for index in range(2_000)]
# Every 40th queue has a dead-letter queue that also matches the pattern: never owned.
DEAD_LETTER = {name: f"{name}-dlq" for name in QUEUES[::40]}
TABLE = "sqsb-many"
INTERVAL_S = 5.0
# status reads the members twice, 1.25 heartbeats apart; the rest is the table, ListQueues
# (3 calls) and one ListDeadLetterSourceQueues per dead-letter queue (50), with slack for a
# loaded box. Reading 2,050 queues' attributes took 26 s here.
STATUS_BOUND_S = INTERVAL_S * 1.25 + 15
# How long the two may take to settle: on a loaded shared box the figure is the emulator's
# (docs/benchmarks.md, fourth pass), so a run there may allow more.
SETTLE_BOUND_S = float(os.environ.get("SQSB_SCALE_SETTLE_S", "300"))


def config(instance_id: str) -> str:
    return f"""
instance_id = "{instance_id}"
handler = "handlers:record"
[coordination]
table_name = "{TABLE}"
heartbeat_interval = {INTERVAL_S}
heartbeat_timeout = 60
fence_margin = 20
rebalance_delay = 1
# The settled state checked is the count ring's fixed point (support.is_fixed_point).
balance = "count"
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


REPO = Path(__file__).resolve().parents[2]


def host_emulator() -> Iterator[str]:
    """The bench's emulator, hosted for scale (module docstring), in a process of its own."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.emulator", "--scale", "--port", "0"],
        env={**os.environ, **DUMMY_ENV},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline() or "{}")  # once it listens (it verifies first)
        assert ready.get("scale"), ready
        yield f"http://{LOOPBACK}:{ready['port']}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def scale_emulator() -> Iterator[str]:
    """SQS's emulator, for this module only."""
    yield from host_emulator()


@pytest.fixture(scope="module")
def table_emulator() -> Iterator[str]:
    """DynamoDB's, apart from SQS's: on AWS the two are separate services, and on one moto
    process the table's conditional writes queued behind 100 receives a second."""
    yield from host_emulator()


def emulator_stalls(endpoint: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{endpoint}/__bench/counts", timeout=30) as response:
        return list(json.load(response)["slow_requests"])


def requests_by(endpoint: str, client: str) -> dict[str, int]:
    """{"sqs:ListQueues": n, ...}: what one access key (one process) asked the emulator."""
    with urllib.request.urlopen(f"{endpoint}/__bench/counts", timeout=30) as response:
        counts = json.load(response)["requests"].get(client, {})
    return {f"{s}:{a}": n for s, actions in counts.items() for a, n in actions.items()}


@pytest.fixture
def endpoint(scale_emulator: str) -> str:
    """Overrides the session emulator's: every SQS client of this module talks to this one."""
    return scale_emulator


@pytest.fixture
def dynamodb(table_emulator: str) -> Any:
    """Overrides the session's: the table lives on its own emulator."""
    return boto3.client("dynamodb", endpoint_url=table_emulator, region_name="us-east-1")


@pytest.fixture
def table_env(table_emulator: str) -> dict[str, str]:
    """What sends a process's DynamoDB calls there (botocore's per-service endpoint)."""
    return {"AWS_ENDPOINT_URL_DYNAMODB": table_emulator}


def create_queues(endpoint: str) -> None:
    """In the emulator's process (`/__bench/create`, as CreateQueue would): 2,050 CreateQueue
    calls over HTTP took 2-3 minutes of the run on the loaded 2-core box, before any daemon."""
    dead_letter = {name: {} for name in DEAD_LETTER.values()}
    arns = post(endpoint, "/__bench/create", {"queues": dead_letter})
    policy = {
        name: {"deadLetterTargetArn": arns["arns"][DEAD_LETTER[name]], "maxReceiveCount": "3"}
        for name in DEAD_LETTER
    }
    queues = {
        name: {"RedrivePolicy": json.dumps(policy[name])} if name in policy else {}
        for name in QUEUES
    }
    post(endpoint, "/__bench/create", {"queues": queues})


def post(endpoint: str, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{endpoint}{path}", data=json.dumps(payload).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return dict(json.load(response))


def owners(dynamodb: Any) -> dict[str, str | None]:
    return {q: row.owner for q, row in ownership_rows(dynamodb, TABLE).items()}


@pytest.mark.timeout(SETTLE_BOUND_S + 180)
def test_two_thousand_queues_over_two_processes(
    dynamodb, daemons, tmp_path, endpoint, table_emulator, table_env
):
    started = time.monotonic()
    create_queues(endpoint)
    created_s = time.monotonic() - started

    first, second = (
        daemons.start(config=config(name), env={"AWS_ACCESS_KEY_ID": name, **table_env}, name=name)
        for name in ("m1", "m2")
    )
    try:
        wait_until(
            lambda: is_fixed_point(owners(dynamodb), QUEUES, ["m1", "m2"]),
            timeout_s=SETTLE_BOUND_S,
            every_s=5.0,  # each look is a 2,000-row read: not every second
            what="2,000 queues settled over m1 and m2",
        )
    except AssertionError:  # the emulator's own stalls (> 1 s) tell its part from the daemons'
        stalls = {"sqs": emulator_stalls(endpoint), "dynamodb": emulator_stalls(table_emulator)}
        print(json.dumps(stalls))
        raise
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
    result = daemons.run_cli(
        "status", "--config", str(path), "--json", env={"AWS_ACCESS_KEY_ID": "status", **table_env}
    )
    status_s = time.monotonic() - status_started
    status_calls = {k: n for k, n in requests_by(endpoint, "status").items() if k[:4] == "sqs:"}
    start_calls = {m: requests_by(endpoint, m) for m in ("m1", "m2")}
    print(f"settled in {settled_s:.1f} s, status --json in {status_s:.1f} s: {status_calls}")
    assert result.stdout, result.stderr
    report = json.loads(result.stdout)
    assert result.returncode == 0, (report["instances"], report["warnings"][:5])
    assert {q["queue"]: q["owner"] for q in report["queues"]} == rows
    # Dead-letter queues are named as such (one ListDeadLetterSourceQueues each), not unclaimed.
    assert sorted(report["dead_letter"]) == sorted(DEAD_LETTER.values())
    assert report["unclaimed"] == []
    assert {i["instance_id"]: i["alive"] for i in report["instances"]} == {"m1": True, "m2": True}
    assert report["all_owned"] is True
    # The daemon's part, independent of the emulator's speed: what status asked SQS.
    assert status_calls == {"sqs:ListQueues": 3, "sqs:ListDeadLetterSourceQueues": 50}
    for calls in start_calls.values():  # one discovery per instance start
        assert calls["sqs:GetQueueAttributes"] >= len(QUEUES) + len(DEAD_LETTER), calls
    assert status_s < STATUS_BOUND_S, f"status took {status_s:.1f} s"
    print(
        f"{len(QUEUES)} queues created in {created_s:.1f} s, settled over two processes in "
        f"{settled_s:.1f} s (shares {shares}); status --json in {status_s:.1f} s"
    )

    # One signal each: a drain that waits out the long polls in flight (20 s) and exits 0. A
    # second signal would skip those waits and exit 1 by design (a forced stop), and two sent
    # at once may reach Python's handler as one: the exit code would be a race.
    for daemon in (first, second):
        daemon.proc.send_signal(signal.SIGTERM)
    assert [first.wait(timeout_s=60), second.wait(timeout_s=60)] == [0, 0]
    lines = [json.loads(line) for line in first.log().splitlines() if line.startswith("{")]
    [warning] = [line for line in lines if "no redrive policy" in line["msg"]]
    assert warning["count"] == len(QUEUES) - len(DEAD_LETTER)  # one line, not 1,950
