"""Security: no message content in any log line, HTTP endpoints on loopback by default.

Real: `sqsbalancerd run` subprocesses against the moto server, at log level debug, with
both log formats; the listening sockets are read from the kernel (psutil).
"""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid
from typing import Any

import psutil
import pytest
from support import queue_depth, read_events, wait_until

from sqsbalancerd.local import create_queues, free_port

pytestmark = pytest.mark.faults


def config(pattern: str, *, log_format: str, http_port: int, http_host: str | None = None) -> str:
    host = f'http_host = "{http_host}"\n' if http_host else ""
    return f"""
handler = "handlers:faults"
coordination.mode = "standalone"
[discovery]
queue_pattern = "{pattern}"
[sqs]
wait_time_seconds = 1
[retry]
base = 0
[observability]
log_level = "debug"
log_format = "{log_format}"
http_port = {http_port}
{host}"""


def send_secrets(sqs: Any, prefix: str, marker: str) -> dict[str, str]:
    """One message of each kind on `prefix`-ok / `prefix`-poison; returns kind -> id."""
    ok = create_queues(sqs, [f"{prefix}-ok"], dead_letter=False)[f"{prefix}-ok"]
    poison = create_queues(sqs, [f"{prefix}-poison"], max_receive_count=2)[f"{prefix}-poison"]
    ids = {
        "json body": sqs.send_message(
            QueueUrl=ok, MessageBody=json.dumps({"secret": marker, "receipt": True})
        ),
        "text body": sqs.send_message(QueueUrl=ok, MessageBody=f"plain text {marker}"),
        "attribute": sqs.send_message(
            QueueUrl=ok,
            MessageBody=json.dumps({"receipt": True}),
            MessageAttributes={"token": {"DataType": "String", "StringValue": marker}},
        ),
        "failing": sqs.send_message(
            QueueUrl=poison, MessageBody=json.dumps({"secret": marker, "fail_always": True})
        ),
    }
    return {kind: response["MessageId"] for kind, response in ids.items()}


@pytest.mark.timeout(90)
def test_secret_marker_in_bodies_and_attributes_reaches_no_log_line(sqs, daemons):
    """Bodies (JSON and plain text), a failing one (logged with its traceback) and a message
    attribute carry a marker; at log level debug, in JSON and console format, the marker and
    the receipt handles appear in no line of the daemon's output."""
    marker = f"SQSB-SECRET-{uuid.uuid4().hex}"
    ports = {"json": free_port(), "console": free_port()}
    ids = {fmt: send_secrets(sqs, f"sec{fmt[0]}", marker) for fmt in ports}
    nodes = {
        fmt: daemons.start(
            config=config(f"^sec{fmt[0]}-", log_format=fmt, http_port=port), name=fmt
        )
        for fmt, port in ports.items()
    }
    every_ok = {i for per in ids.values() for kind, i in per.items() if kind != "failing"}

    def handled() -> set[str]:
        events = read_events(daemons.events_path)
        return {e["id"] for e in events if e["event"] == "end" and e["outcome"] == "ok"}

    wait_until(lambda: handled() >= every_ok, timeout_s=60, what="the messages handled")
    for fmt in ports:
        dlq = sqs.get_queue_url(QueueName=f"sec{fmt[0]}-poison-dlq")["QueueUrl"]
        wait_until(
            lambda u=dlq: queue_depth(sqs, u) == (1, 0),
            timeout_s=30,
            what="the failing message in its DLQ",
        )
    for port in ports.values():  # an HTTP request logs a debug line: debug is really on
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).close()
    wait_until(
        lambda: all("HTTP " in d.log() for d in nodes.values()), timeout_s=10, what="a debug line"
    )
    for daemon in nodes.values():
        daemon.terminate()
    for daemon in nodes.values():
        assert daemon.wait(timeout_s=30) == 0, daemon.log()

    events = read_events(daemons.events_path)
    receipts = {e["receipt_handle"] for e in events if e.get("receipt_handle")}
    failures = [e for e in events if e["event"] == "end" and e["outcome"] == "failed"]
    assert len(receipts) == 4 and len(failures) == 4
    for fmt, daemon in nodes.items():
        log = daemon.log()
        assert "handler failed" in log and "Traceback" in log  # the failure was logged in full
        leaked = [line for line in log.splitlines() if marker in line]
        assert not leaked, (fmt, leaked[:3])
        assert not [r for r in receipts if r in log], fmt
        assert "plain text" not in log
    lines = sum(len(d.log().splitlines()) for d in nodes.values())
    print(
        f"\nsecret marker: {len(every_ok)} handled + 2 failing (traceback logged) messages, "
        f"json and console at debug: 0 of {lines} log lines hold the marker or a receipt "
        f"handle"
    )


def listening(pid: int, port: int) -> set[str]:
    return {
        c.laddr.ip
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


def non_loopback_ipv4() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    return None


def can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.timeout(60)
def test_http_endpoints_bind_loopback_unless_configured(sqs, daemons):
    create_queues(sqs, ["bind-a"], dead_letter=False)
    ports = {"default": free_port(), "all": free_port()}
    nodes = {
        "default": daemons.start(
            config=config("^bind-", log_format="json", http_port=ports["default"]), name="dflt"
        ),
        "all": daemons.start(
            config=config("^bind-", log_format="json", http_port=ports["all"], http_host="0.0.0.0"),
            name="all",
        ),
    }
    for name, daemon in nodes.items():
        wait_until(
            lambda d=daemon, p=ports[name]: listening(d.proc.pid, p),
            timeout_s=30,
            what=f"{name} listening",
        )
    assert listening(nodes["default"].proc.pid, ports["default"]) == {"127.0.0.1"}
    assert listening(nodes["all"].proc.pid, ports["all"]) == {"0.0.0.0"}  # when configured
    address = non_loopback_ipv4()
    if address is not None:
        assert not can_connect(address, ports["default"])
        assert can_connect(address, ports["all"])
    for daemon in nodes.values():
        daemon.terminate()
    for daemon in nodes.values():
        assert daemon.wait(timeout_s=30) == 0, daemon.log()
    print(
        f"\nHTTP: default binds 127.0.0.1 only; http_host=0.0.0.0 binds all; non-loopback "
        f"address {address or '(none on this machine: connect check skipped)'}"
    )
