"""Operating the daemon: /metrics, /healthz, /readyz, `health`, `status --json`, `init-table`."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest
from support import read_events, wait_until

from sqsbalancerd.local import create_queues, free_port, send_messages

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def config(port: int) -> str:
    return f"""
handler = "handlers:record"
instance_id = "ops-1"
[coordination]
heartbeat_interval = 1
heartbeat_timeout = 4
rebalance_delay = 1
[discovery]
queue_pattern = "^ops-"
interval = 1
[sqs]
wait_time_seconds = 1
[observability]
http_port = {port}
log_format = "json"
"""


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def test_metrics_health_and_status_during_run(sqs, daemons, tmp_path):
    urls = create_queues(sqs, ["ops-a", "ops-b"])
    for url in urls.values():
        send_messages(sqs, url, [json.dumps({"n": n}) for n in range(5)])
    port = free_port()
    text = config(port)
    config_path = tmp_path / "ops.toml"
    config_path.write_text(text)
    daemon = daemons.start(config=text)
    base = f"http://127.0.0.1:{port}"

    wait_until(lambda: get(f"{base}/readyz")[0] == 200, timeout_s=30, what="/readyz 200")
    wait_until(
        lambda: len([e for e in read_events(daemons.events_path) if e["event"] == "end"]) >= 10,
        timeout_s=30,
        what="10 messages handled",
    )
    assert get(f"{base}/healthz")[0] == 200
    metrics = wait_until(
        lambda: _succeeded(get(f"{base}/metrics")[1]) >= 10 and get(f"{base}/metrics")[1],
        timeout_s=10,
        what="metrics",
    )
    assert 'sqsbalancerd_aws_calls_total{action="ReceiveMessage"' in metrics
    assert "sqsbalancerd_owned_queues 2.0" in metrics
    assert "sqsbalancerd_heartbeat_age_seconds" in metrics

    health = daemons.run_cli("health", "--config", str(config_path))
    assert health.returncode == 0, health.stdout + health.stderr
    status = daemons.run_cli("status", "--config", str(config_path), "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["application"] == "sqsbalancer"
    assert report["table"] == "sqsbalancer-coordination"
    [instance] = report["instances"]
    assert instance["instance_id"] == "ops-1"
    assert instance["alive"] is True
    assert instance["status"] == "active"
    assert sorted(instance["queues"]) == ["ops-a", "ops-b"]
    assert {q["queue"]: q["owner"] for q in report["queues"]} == {
        "ops-a": "ops-1",
        "ops-b": "ops-1",
    }

    daemon.terminate()
    assert daemon.wait(timeout_s=30) == 0, daemon.log()
    after = daemons.run_cli("health", "--config", str(config_path))
    assert after.returncode == 1
    status_after = daemons.run_cli("status", "--config", str(config_path), "--json")
    assert status_after.returncode == 1  # nobody owns the queues any more
    released = {q["queue"]: q["owner"] for q in json.loads(status_after.stdout)["queues"]}
    assert released == {"ops-a": None, "ops-b": None}


def _succeeded(metrics: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("sqsbalancerd_messages_total{") and "succeeded" in line
    )


def test_status_with_a_missing_table_exits_2(daemons, endpoint):
    result = daemons.run_cli("status", env={"SQSBALANCERD_DISCOVERY__QUEUE_PATTERN": "^x"})
    assert result.returncode == 2
    assert "sqsbalancer-coordination" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_init_table_print_matches_the_deployed_template(daemons):
    result = daemons.run_cli(
        "init-table", "--print", env={"SQSBALANCERD_DISCOVERY__QUEUE_PATTERN": "^x"}
    )
    assert result.returncode == 0, result.stderr
    deployed = json.loads((ROOT / "deploy" / "coordination-table.cfn.json").read_text())
    assert json.loads(result.stdout) == deployed


def test_init_table_creates_the_table(daemons, dynamodb):
    result = daemons.run_cli("init-table", env={"SQSBALANCERD_DISCOVERY__QUEUE_PATTERN": "^x"})
    assert result.returncode == 0, result.stderr
    table = dynamodb.describe_table(TableName="sqsbalancer-coordination")["Table"]
    assert table["TableStatus"] == "ACTIVE"
    assert {k["AttributeName"] for k in table["KeySchema"]} == {"pk", "sk"}


def test_a_taken_port_fails_the_start_before_joining(daemons, dynamodb, sqs):
    """The HTTP port is taken (a second instance on one host): the bind is the first step of
    the start, so the instance exits 2 before it registers or receives; no row is left for
    the others to count until its heartbeat times out."""
    create_queues(sqs, ["ops-a"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        daemon = daemons.start(config=config(taken.getsockname()[1]))
        assert daemon.wait(timeout_s=60) == 2, daemon.log()
    log = daemon.log()
    assert "http_port" in log and "joined the cluster" not in log
    # Not even the table was created: the bind came before the coordinator's first call.
    with pytest.raises(dynamodb.exceptions.ResourceNotFoundException):
        dynamodb.scan(TableName="sqsbalancer-coordination")


def test_a_missing_named_queue_fails_the_start_before_joining(daemons, dynamodb):
    text = config(0).replace('queue_pattern = "^ops-"', 'queues = ["ops-missing"]')
    daemon = daemons.start(config=text)

    assert daemon.wait(timeout_s=60) == 2, daemon.log()
    assert "ops-missing" in daemon.log() and "joined the cluster" not in daemon.log()
