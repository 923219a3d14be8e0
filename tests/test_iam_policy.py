"""The IAM policy in deploy/ lists exactly the actions the daemon calls.

Every AWS operation of an end-to-end run (table creation, identity takeover, discovery by
pattern and by name, receive, delete, retry, release, leave) is recorded server-side,
mapped to its IAM action, and compared with the policy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
from recording_server import RecordingServer
from support import read_events, wait_until

from sqsbalancerd.local import DUMMY_ENV, create_queues, send_messages

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "deploy" / "iam-policy.json"
# Batch calls are authorised by their single-message actions.
IAM_ACTION_FOR = {
    ("sqs", "DeleteMessageBatch"): "sqs:DeleteMessage",
    ("sqs", "ChangeMessageVisibilityBatch"): "sqs:ChangeMessageVisibility",
}


def iam_action(service: str, action: str) -> str:
    return IAM_ACTION_FOR.get((service, action), f"{service}:{action}")


def policy_actions() -> set[str]:
    statements = json.loads(POLICY.read_text())["Statement"]
    return {action for s in statements for action in s["Action"]}


CONFIG = """
handler = "handlers:record"
instance_id = "iam-test"
[coordination]
heartbeat_interval = 1
heartbeat_timeout = 3
rebalance_delay = 1
[discovery]
queue_pattern = "^orders-"
queues = ["named-orders"]
interval = 1
[sqs]
wait_time_seconds = 1
[retry]
base = 0
[observability]
http_port = 0
log_format = "json"
"""


def test_policy_lists_exactly_the_actions_an_end_to_end_run_calls(tmp_path):
    with RecordingServer() as server:
        env = {**DUMMY_ENV, "AWS_ENDPOINT_URL": server.endpoint_url}
        sqs = boto3.client("sqs", endpoint_url=server.endpoint_url, region_name="us-east-1")
        dynamodb = boto3.client(
            "dynamodb", endpoint_url=server.endpoint_url, region_name="us-east-1"
        )
        urls = create_queues(sqs, ["orders-1", "named-orders"])
        for url in urls.values():
            send_messages(sqs, url, [json.dumps({"fail_once": True}), json.dumps({})])
        server.operations.clear()
        events = tmp_path / "events.jsonl"
        config = tmp_path / "c.toml"
        config.write_text(CONFIG)
        run_env = {
            **_base_env(),
            **env,
            "PYTHONPATH": str(ROOT / "tests"),
            "SQSB_TEST_EVENTS": str(events),
        }
        created = subprocess.run(
            [sys.executable, "-m", "sqsbalancerd", "init-table", "--config", str(config)],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stderr
        # A stale row under our id (PutItem, which the daemon calls too): the daemon
        # watches its counter for a timeout, then takes the identity over.
        _seed_dead_member(dynamodb)
        proc = subprocess.Popen(
            [sys.executable, "-m", "sqsbalancerd", "run", "--config", str(config)],
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
        )
        try:
            wait_until(
                lambda: (
                    sum(
                        1
                        for e in read_events(events)
                        if e["event"] == "end" and e["outcome"] == "ok"
                    )
                    >= 4
                ),
                timeout_s=60,
                what="all four messages handled",
            )
            proc.terminate()
            output, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        assert proc.returncode == 0, output

    called = {iam_action(service, action) for service, action in server.operations}
    assert called == policy_actions()


def _seed_dead_member(dynamodb: Any) -> None:
    dynamodb.put_item(
        TableName="sqsbalancer-coordination",
        Item={
            "pk": {"S": "app#sqsbalancer"},
            "sk": {"S": "member#iam-test"},
            "instance_id": {"S": "iam-test"},
            "counter": {"N": "7"},
            "epoch": {"S": "old"},
            "protocol": {"N": "1"},
            "status": {"S": "active"},
        },
    )


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("SQSBALANCERD_", "AWS_"))}
