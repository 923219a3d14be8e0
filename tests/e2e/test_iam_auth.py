"""Daemons against a moto server that authenticates and authorises every request.

moto checks each request's SigV4 signature against the IAM access keys it holds and judges
its action against the caller's IAM policies once `/moto-api/reset-auth` sets its
INITIAL_NO_AUTH_ACTION_COUNT to 0. What moto does differently from AWS (read in
moto/core/authorization.py, moto/iam/access_control.py, moto/sqs/responses.py; moto 5.2):
- a batch call is judged as its own action (`sqs:DeleteMessageBatch`), where AWS
  authorises it by the single-message action (`sqs:DeleteMessage`);
- DynamoDB calls are judged against resource `*`, never the table ARN (SQS calls are judged
  against the queue's ARN, as in AWS).
`for_moto` translates the generated policy accordingly and nothing else: the actions, the
queue ARNs and the omissions are the generated ones. Every refusal (bad signature, unknown
key, access denied) is recorded server-side, and the tests assert there is none.

Two scenarios, each on the lean and on the plain boto3 data path:
- a two-instance cluster under a user holding only `sqsbalancerd iam-policy`'s output;
- keys that rotate: the daemon's credentials come from a `credential_process` whose key
  changes every few seconds, and each replaced key is deleted from the emulator soon after.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.iam.access_control import IAMRequestBase
from support import queue_depth, read_events, wait_until

from sqsbalancerd.config import load_settings
from sqsbalancerd.iam_policy import build_policy

pytestmark = pytest.mark.e2e

ACCOUNT_ID = "123456789012"  # moto's default account
REGION = "us-east-1"
TESTS = Path(__file__).resolve().parent.parent
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
BATCH_OF = {
    "sqs:DeleteMessage": "sqs:DeleteMessageBatch",
    "sqs:ChangeMessageVisibility": "sqs:ChangeMessageVisibilityBatch",
}


def for_moto(document: dict[str, Any]) -> dict[str, Any]:
    """The policy as moto can evaluate it the way AWS evaluates the original (docstring)."""
    statements = []
    for statement in document["Statement"]:
        actions = list(statement["Action"])
        actions += [BATCH_OF[a] for a in statement["Action"] if a in BATCH_OF]
        is_dynamodb = all(a.startswith("dynamodb:") for a in actions)
        resource = "*" if is_dynamodb else statement["Resource"]
        statements.append({**statement, "Action": actions, "Resource": resource})
    return {**document, "Statement": statements}


@dataclass
class AuthLog:
    """Every authenticated request (time, action, access key) and every refusal."""

    accepted: list[tuple[float, str, str]] = field(default_factory=list)
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def keys_for(self, action: str) -> set[str]:
        with self.lock:
            return {key for _, a, key in self.accepted if a == action}


def _key_of(request: Any) -> str:
    return str(request._headers["Authorization"].split("Credential=")[1].split("/")[0])


@pytest.fixture
def auth(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[AuthLog, Any]]:
    """Auth enforced on the (in-process) moto server; yields the log and an admin session."""
    log = AuthLog()
    check = IAMRequestBase.check_action_permitted

    def recording_check(self: Any, resource: str) -> None:
        check(self, resource)  # raises on refusal; the refusal hooks below record it
        with log.lock:
            log.accepted.append((time.time(), self._action, _key_of(self)))

    def refusal(kind: str, original: Any) -> Any:
        def refuse(self: Any, *args: Any) -> None:
            with log.lock:
                log.refused.append((kind, self._action, _key_of(self)))
            original(self, *args)

        return refuse

    monkeypatch.setattr(IAMRequestBase, "check_action_permitted", recording_check)
    for name in ("_raise_access_denied", "_raise_invalid_access_key"):
        for cls in IAMRequestBase.__subclasses__():
            monkeypatch.setattr(cls, name, refusal(name, getattr(cls, name)))
    for cls in IAMRequestBase.__subclasses__():
        original = cls._raise_signature_does_not_match
        monkeypatch.setattr(cls, "_raise_signature_does_not_match", refusal("signature", original))
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION)
    iam.create_user(UserName="admin")
    iam.put_user_policy(
        UserName="admin",
        PolicyName="all",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            }
        ),
    )
    key = iam.create_access_key(UserName="admin")["AccessKey"]
    admin = boto3.session.Session(
        aws_access_key_id=key["AccessKeyId"],
        aws_secret_access_key=key["SecretAccessKey"],
        region_name=REGION,
    )
    _set_auth(endpoint, "0")
    try:
        yield log, admin
    finally:
        _set_auth(endpoint, "inf")


def _set_auth(endpoint: str, count: str) -> None:
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        method="POST",
        data=count.encode(),
        headers={"Content-Type": "text/plain"},  # not a form: moto reads the raw body
    )
    urllib.request.urlopen(request, timeout=10).close()


def worker_user(iam: Any, name: str, policy: dict[str, Any]) -> dict[str, str]:
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="sqsbalancerd", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
    }


def config(instance_id: str, *, pattern: str, is_lean: bool) -> str:
    return f"""
instance_id = "{instance_id}"
handler = "handlers:record"
[coordination]
table_name = "sqsb-auth"
heartbeat_interval = 1
heartbeat_timeout = 4
rebalance_delay = 1
[discovery]
queue_pattern = "{pattern}"
interval = 1
[sqs]
wait_time_seconds = 1
lean_requests = {str(is_lean).lower()}
[retry]
base = 0
[observability]
http_port = 0
log_format = "json"
"""


def generated_policy(daemons: Any, text: str) -> dict[str, Any]:
    path = daemons.tmp_path / "policy.toml"
    path.write_text(text)
    settings = load_settings(path, resolve_region=False)
    return build_policy(settings, region=REGION, account_id=ACCOUNT_ID).document


def handled_ok(daemons: Any) -> set[str]:
    return {
        e["id"]
        for e in read_events(daemons.events_path)
        if e["event"] == "end" and e["outcome"] == "ok"
    }


def send(sqs: Any, url: str, bodies: list[str]) -> set[str]:
    entries = [{"Id": str(n), "MessageBody": body} for n, body in enumerate(bodies)]
    response = sqs.send_message_batch(QueueUrl=url, Entries=entries)
    assert not response.get("Failed"), response
    return {entry["MessageId"] for entry in response["Successful"]}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("is_lean", [True, False], ids=["lean", "boto3"])
def test_a_cluster_runs_on_the_generated_policy_alone(daemons, auth, is_lean):
    log, admin = auth
    endpoint = daemons.endpoint
    sqs = admin.client("sqs", endpoint_url=endpoint)
    urls = {f"auth-{n}": sqs.create_queue(QueueName=f"auth-{n}")["QueueUrl"] for n in range(6)}
    outside = sqs.create_queue(QueueName="other-queue")["QueueUrl"]
    sent: set[str] = set()
    for url in urls.values():  # a failure once each: ChangeMessageVisibility(Batch) too
        sent |= send(sqs, url, [json.dumps({"fail_once": True}), "{}", "{}"])
    policy = for_moto(generated_policy(daemons, config("p", pattern="^auth-", is_lean=is_lean)))
    keys = worker_user(admin.client("iam", endpoint_url=endpoint), "worker", policy)
    nodes = [
        daemons.start(
            config=config(name, pattern="^auth-", is_lean=is_lean),
            name=name,
            env=keys,
            unset=("AWS_SESSION_TOKEN",),
        )
        for name in ("n1", "n2")
    ]
    wait_until(lambda: sent <= handled_ok(daemons), timeout_s=90, what="every message handled")
    wait_until(
        lambda: all(queue_depth(sqs, url) == (0, 0) for url in urls.values()),
        timeout_s=30,
        what="every message deleted",
    )
    for node in nodes:
        node.terminate()
    for node in nodes:
        assert node.wait(timeout_s=30) == 0, node.log()[-3000:]

    worker = {key for _, _, key in log.accepted if key == keys["AWS_ACCESS_KEY_ID"]}
    assert worker, "no request was authenticated as the worker"
    assert log.refused == []
    used = {a for _, a, key in log.accepted if key == keys["AWS_ACCESS_KEY_ID"]}
    print(f"\n{len(log.accepted)} requests authorised; the workers used: {sorted(used)}")
    assert {"sqs:ReceiveMessage", "sqs:DeleteMessageBatch", "dynamodb:UpdateItem"} <= used
    assert "sqs:ChangeMessageVisibilityBatch" in used or "sqs:ChangeMessageVisibility" in used
    # And the emulator does enforce the policy: a queue outside the pattern is refused.
    worker_sqs = boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
    )
    with pytest.raises(worker_sqs.exceptions.ClientError, match="AccessDenied"):
        worker_sqs.receive_message(QueueUrl=outside)


class Rotator:
    """A new worker key every `every_s`, where the credential_process reads it; each replaced
    key is deleted from the emulator `revoke_after_s` after its replacement (a new IAM user
    per key: moto, like AWS, allows two keys per user)."""

    def __init__(self, iam: Any, policy: dict[str, Any], path: Path, *, every_s: float) -> None:
        self._iam = iam
        self._policy = policy
        self._path = path
        self.every_s = every_s
        self.revoke_after_s = 2 * every_s  # a client renews within every_s (+ one call)
        self.issued: list[tuple[str, str]] = []  # (user, key id)
        self.revoked: list[str] = []
        self._replaced_at: list[tuple[float, str, str]] = []
        self.error: BaseException | None = None

    def rotate(self) -> None:
        user = f"rot-worker-{len(self.issued)}"
        keys = worker_user(self._iam, user, self._policy)
        temporary = self._path.with_suffix(".tmp")
        temporary.write_text(
            json.dumps(
                {
                    "AccessKeyId": keys["AWS_ACCESS_KEY_ID"],
                    "SecretAccessKey": keys["AWS_SECRET_ACCESS_KEY"],
                }
            )
        )
        temporary.replace(self._path)  # atomic: the process never reads half a file
        if self.issued:
            self._replaced_at.append((time.monotonic(), *self.issued[-1]))
        self.issued.append((user, keys["AWS_ACCESS_KEY_ID"]))

    def revoke_due(self) -> None:
        while self._replaced_at and time.monotonic() - self._replaced_at[0][0] >= (
            self.revoke_after_s
        ):
            _, user, key = self._replaced_at.pop(0)
            self._iam.delete_access_key(UserName=user, AccessKeyId=key)
            self.revoked.append(key)

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.wait(self.every_s):
                self.rotate()
                self.revoke_due()
        except BaseException as exc:  # read by the test through .error
            self.error = exc


def max_gap_s(times: list[float], start: float, end: float) -> float:
    points = [start, *(t for t in times if start <= t <= end), end]
    return max(b - a for a, b in itertools.pairwise(points))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("is_lean", [True, False], ids=["lean", "boto3"])
def test_rotating_keys_never_interrupt_receives_deletes_or_heartbeats(daemons, auth, is_lean):
    log, admin = auth
    endpoint = daemons.endpoint
    sqs = admin.client("sqs", endpoint_url=endpoint)
    urls = {f"rot-{n}": sqs.create_queue(QueueName=f"rot-{n}")["QueueUrl"] for n in range(3)}
    text = config("rot-1", pattern="^rot-", is_lean=is_lean)
    policy = for_moto(generated_policy(daemons, text))
    key_file = daemons.tmp_path / "key.json"
    rotator = Rotator(admin.client("iam", endpoint_url=endpoint), policy, key_file, every_s=3.0)
    rotator.rotate()
    aws_config = daemons.tmp_path / "aws-config"
    process = f"{sys.executable} {TESTS / 'credential_process.py'} {key_file} {rotator.every_s}"
    aws_config.write_text(f"[default]\ncredential_process = {process}\n")
    env = {
        "AWS_CONFIG_FILE": str(aws_config),
        "AWS_SHARED_CREDENTIALS_FILE": str(daemons.tmp_path / "no-credentials"),
    }
    node = daemons.start(config=text, name="rot", env=env, unset=CREDENTIAL_KEYS)
    stop = threading.Event()
    thread = threading.Thread(target=rotator.run, args=(stop,), name="test-rotator")
    sent: set[str] = set()
    try:
        wait_until(lambda: log.keys_for("sqs:ReceiveMessage"), timeout_s=30, what="a receive")
        thread.start()
        started = time.time()
        while time.time() - started < 7 * rotator.every_s:  # feed while keys come and go
            for url in urls.values():
                sent |= send(sqs, url, ["{}"])
            stop.wait(0.3)
        ended = time.time()
        wait_until(lambda: sent <= handled_ok(daemons), timeout_s=30, what="all handled")
        wait_until(
            lambda: all(queue_depth(sqs, url) == (0, 0) for url in urls.values()),
            timeout_s=30,
            what="every message deleted",
        )
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=30)
    node.terminate()
    assert node.wait(timeout_s=30) == 0, node.log()[-3000:]
    assert rotator.error is None, rotator.error

    assert log.refused == [], log.refused[:5]
    worker_keys = {key for _, key in rotator.issued}
    figures = {}
    for action in ("sqs:ReceiveMessage", "sqs:DeleteMessageBatch", "dynamodb:UpdateItem"):
        keys = log.keys_for(action) & worker_keys
        gap_s = max_gap_s(
            [t for t, a, k in log.accepted if a == action and k in worker_keys], started, ended
        )
        figures[action] = (len(keys), round(gap_s, 2))
    print(
        f"\n{len(rotator.issued)} keys issued, {len(rotator.revoked)} deleted while running; "
        f"{len(sent)} messages; (keys used, longest gap s) per action: {figures}"
    )
    assert len(rotator.revoked) >= 4
    for action, (keys_used, gap_s) in figures.items():
        assert keys_used >= 4, (action, figures)  # the daemon moved on to the new keys
        # Heartbeats every 1 s, 1 s long polls, deletes within a second of handling.
        assert gap_s < 3.0, (action, figures)
