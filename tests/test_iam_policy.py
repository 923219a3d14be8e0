"""`sqsbalancerd iam-policy`: the least-privilege policy for a configuration.

Every AWS operation of an end-to-end run (table creation, identity takeover, discovery by
pattern and by name, receive, delete, retry, release, leave) is recorded server-side,
mapped to its IAM action, and compared with the policy generated for that run's
configuration; deploy/iam-policy.json is the policy for config.example.toml. Queue
resources from patterns are unit-tested here; tests/e2e/test_iam_auth.py runs a cluster
under a user holding nothing but the generated policy.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
from recording_server import RecordingServer
from support import read_events, wait_until

from sqsbalancerd.config import Settings, load_settings
from sqsbalancerd.iam_policy import build_policy
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


def policy_actions(document: dict[str, Any]) -> set[str]:
    return {action for s in document["Statement"] for action in s["Action"]}


def generated(config: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sqsbalancerd", "iam-policy", *args]
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.run(
        command, env={**_base_env(), **DUMMY_ENV}, capture_output=True, text=True, timeout=60
    )


def test_deploy_policy_is_the_generated_policy_of_the_example_config() -> None:
    result = generated(ROOT / "config.example.toml")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # "^orders-" has a literal prefix: no warning
    assert result.stdout == POLICY.read_text()


def _settings(**discovery: Any) -> Settings:
    return Settings(discovery=discovery, aws={"region": "eu-west-1"})  # type: ignore[arg-type]


def queue_resources(pattern: str) -> tuple[list[str], tuple[str, ...]]:
    policy = build_policy(_settings(queue_pattern=pattern), region="r", account_id="1")
    [statement] = [s for s in policy.document["Statement"] if s["Sid"] == "ConsumeQueues"]
    names = [arn.removeprefix("arn:aws:sqs:r:1:") for arn in statement["Resource"]]
    return names, policy.warnings


@pytest.mark.parametrize(
    ("pattern", "names", "warns"),
    [
        ("^orders-", ["orders-*"], False),
        ("^(a|b)-", ["a-*", "b-*"], False),
        ("^(eu|us)-jobs", ["eu-jobs*", "us-jobs*"], False),
        ("^jobs$", ["jobs"], False),
        ("^ab?c", ["a*"], False),
        (r"^orders\.v2", ["orders.v2*"], False),
        ("^orders-[0-9]+$", ["orders-*"], False),
        ("named-orders", ["*named-orders*"], True),  # re.search: anywhere in the name
        ("^.*-jobs", ["*"], True),
        ("(?i)^orders", ["*"], True),
        ("^a|^b", ["a*", "b*"], False),
        ("^a|b", ["*"], True),  # b anywhere
    ],
)
def test_queue_resources_follow_the_pattern(pattern: str, names: list[str], warns: bool) -> None:
    found, warnings = queue_resources(pattern)
    assert found == names
    assert bool(warnings) == warns
    for name in ("orders-1", "a-x", "jobs", "named-orders", "x-jobs"):
        if re.search(pattern, name):  # what discovery consumes, the policy allows
            assert any(fnmatch.fnmatchcase(name, glob) for glob in found), (pattern, name)


def test_named_queues_are_allowed_by_name_and_looked_up() -> None:
    url = "https://sqs.eu-west-1.amazonaws.com/222233334444/by-url"
    policy = build_policy(
        _settings(queue_pattern="^orders-", queues=["named-orders", url]),
        region="eu-west-1",
        account_id="111122223333",
    )
    [statement] = [s for s in policy.document["Statement"] if s["Sid"] == "ConsumeQueues"]
    assert statement["Resource"] == [
        "arn:aws:sqs:eu-west-1:111122223333:orders-*",
        "arn:aws:sqs:eu-west-1:111122223333:named-orders",
        "arn:aws:sqs:eu-west-1:222233334444:by-url",
    ]
    assert "sqs:GetQueueUrl" in statement["Action"]
    # Batch calls are authorised by the single-message actions: no *Batch action exists.
    assert not [a for a in statement["Action"] if a.endswith("Batch")]


def test_table_actions_follow_the_coordination_mode() -> None:
    def table_actions(**coordination: Any) -> set[str]:
        settings = Settings(
            discovery={"queue_pattern": "^q-"},  # type: ignore[arg-type]
            coordination=coordination,  # type: ignore[arg-type]
        )
        document = build_policy(settings, region="r", account_id="1").document
        return {a for a in policy_actions(document) if a.startswith("dynamodb:")}

    created = table_actions(create_table=True)
    assert {"dynamodb:CreateTable", "dynamodb:UpdateTimeToLive"} <= created
    assert table_actions(create_table=False) == created - {
        "dynamodb:CreateTable",
        "dynamodb:UpdateTimeToLive",
    }
    assert table_actions(mode="standalone") == set()


def test_a_broad_pattern_warns_on_stderr_and_still_prints_the_policy(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[discovery]\nqueue_pattern = "^.*-jobs"\n')
    result = generated(config, "--account-id", "111122223333", "--region", "eu-west-1")
    assert result.returncode == 0, result.stderr
    assert "sqsbalancerd: warning: discovery.queue_pattern '^.*-jobs'" in result.stderr
    document = json.loads(result.stdout)
    assert "arn:aws:sqs:eu-west-1:111122223333:*" in document["Statement"][1]["Resource"]


def test_without_queues_to_consume_it_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[workers]\npool_size = 2\n")
    result = generated(config)
    assert result.returncode == 2
    assert "queue_pattern or queues" in result.stderr


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
    settings = load_settings(config, resolve_region=False)
    assert called == policy_actions(build_policy(settings, region="r", account_id="1").document)


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
