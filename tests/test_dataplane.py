"""The lean SQS path: same answers as boto3, errors through boto3, calls counted.

Real: a moto server on loopback (the path is HTTP, so in-process mocks cannot see it).
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, SSLError

from sqsbalancerd import dataplane, leanhttp
from sqsbalancerd.aws import AwsOptions, error_code, is_transient, sqs_client
from sqsbalancerd.dataplane import LeanSqs, lean_or_plain
from sqsbalancerd.local import free_port
from sqsbalancerd.stats import Stats


def lean_client(endpoint: str, stats: Stats | None = None, *, resend: bool = True) -> LeanSqs:
    """As the daemon builds it: the boto3 client under it counts its calls in `stats` too."""
    options = AwsOptions(region="us-east-1", endpoint_url=endpoint, max_attempts=2)
    return LeanSqs(sqs_client(options, stats), stats, resend_errors=resend)


def counted(stats: Stats) -> dict[tuple[str, str, str], int]:
    return {key: n for key, n in stats.aws_calls().items() if n}


def test_receive_gives_what_boto3_gives_including_binary_attributes(sqs, endpoint):
    url = sqs.create_queue(QueueName="lean-recv")["QueueUrl"]
    sqs.send_message(
        QueueUrl=url,
        MessageBody='{"n": 1}',
        MessageAttributes={
            "blob": {"DataType": "Binary", "BinaryValue": b"\x00\xffraw"},
            "tag": {"DataType": "String", "StringValue": "café"},
        },
    )
    lean = lean_client(endpoint)

    response = lean.receive_message(
        QueueUrl=url,
        MaxNumberOfMessages=10,
        WaitTimeSeconds=0,
        VisibilityTimeout=0,  # visible again at once: boto3 receives the same message below
        MessageSystemAttributeNames=["All"],
        MessageAttributeNames=["All"],
    )
    reference = sqs.receive_message(
        QueueUrl=url,
        MaxNumberOfMessages=10,
        MessageSystemAttributeNames=["All"],
        MessageAttributeNames=["All"],
    )

    [message] = response["Messages"]
    [expected] = reference["Messages"]
    for key in ("MessageId", "Body", "MD5OfBody", "MD5OfMessageAttributes", "MessageAttributes"):
        assert message[key] == expected[key], key
    assert message["MessageAttributes"]["blob"]["BinaryValue"] == b"\x00\xffraw"
    assert set(message["Attributes"]) == set(expected["Attributes"])


def test_batch_delete_and_visibility_change_act_and_report_per_entry(sqs, endpoint):
    url = sqs.create_queue(QueueName="lean-batch")["QueueUrl"]
    for n in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=str(n))
    stats = Stats()
    lean = lean_client(endpoint, stats)
    messages = lean.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)[
        "Messages"
    ]
    assert len(messages) == 3

    deleted = lean.delete_message_batch(
        QueueUrl=url,
        Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages[:2])
        ],
    )
    changed = lean.change_message_visibility_batch(
        QueueUrl=url,
        Entries=[
            {"Id": "back", "ReceiptHandle": messages[2]["ReceiptHandle"], "VisibilityTimeout": 0}
        ],
    )

    assert sorted(e["Id"] for e in deleted["Successful"]) == ["0", "1"]
    assert [e["Id"] for e in changed["Successful"]] == ["back"]
    again = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    assert [m["Body"] for m in again] == [messages[2]["Body"]]  # deleted two, released one
    assert counted(stats) == {
        ("sqs", "ReceiveMessage", "ok"): 1,
        ("sqs", "DeleteMessageBatch", "ok"): 1,
        ("sqs", "ChangeMessageVisibilityBatch", "ok"): 1,
    }


def test_an_error_goes_through_boto3_and_raises_its_client_error(endpoint):
    stats = Stats()
    lean = lean_client(endpoint, stats)
    missing = f"{endpoint}/123456789012/no-such-queue"

    with pytest.raises(ClientError) as raised:
        lean.receive_message(QueueUrl=missing, WaitTimeSeconds=0)

    assert "NonExistentQueue" in str(raised.value) or "QueueDoesNotExist" in str(raised.value)
    calls = counted(stats)
    # Once: the lean attempt and boto3's resend are one logical call, like boto3's retries.
    assert calls == {("sqs", "ReceiveMessage", "client_error"): 1}


class Flaky(BaseHTTPRequestHandler):
    """Answers every request 503 and records its X-Amz-Target and User-Agent."""

    seen: ClassVar[list[str]] = []
    agents: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        type(self).seen.append(self.headers.get("X-Amz-Target", ""))
        type(self).agents.append(self.headers.get("User-Agent", ""))
        body = b'{"__type":"ServiceUnavailable","message":"try later"}'
        self.send_response(503)
        self.send_header("Content-Type", "application/x-amz-json-1.0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def failing_sqs() -> Iterator[str]:
    """An endpoint answering every request 503 (Flaky.seen lists them)."""
    Flaky.seen = []
    Flaky.agents = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=server.serve_forever, name="flaky-sqs", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_a_server_error_is_retried_by_boto3_with_its_own_attempts(failing_sqs):
    stats = Stats()
    lean = lean_client(failing_sqs, stats)
    with pytest.raises(ClientError):
        lean.delete_message_batch(QueueUrl="http://q", Entries=[{"Id": "1", "ReceiptHandle": "r"}])
    # One lean attempt, then boto3's two (max_attempts=2): nothing swallowed, nothing looped.
    assert Flaky.seen == ["AmazonSQS.DeleteMessageBatch"] * 3
    # Counted once (503: slow down), not once for the lean attempt and once for boto3's.
    assert counted(stats) == {("sqs", "DeleteMessageBatch", "throttled"): 1}
    # Every request names the daemon, the lean one and boto3's alike.
    assert all("sqsbalancerd/" in agent for agent in Flaky.agents), Flaky.agents


def test_without_resending_a_server_error_is_raised_at_once_as_boto3_would(failing_sqs):
    lean = lean_client(failing_sqs, resend=False)
    with pytest.raises(ClientError) as raised:
        lean.delete_message_batch(QueueUrl="http://q", Entries=[{"Id": "1", "ReceiptHandle": "r"}])
    assert Flaky.seen == ["AmazonSQS.DeleteMessageBatch"]  # one request: the caller retries
    assert raised.value.response["Error"]["Code"] == "ServiceUnavailable"
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert is_transient(raised.value)


def test_without_resending_errors_carry_the_codes_boto3_gives(sqs, endpoint):
    missing = f"{endpoint}/123456789012/no-such-queue"
    lean = lean_client(endpoint, resend=False)
    with pytest.raises(ClientError) as lean_raised:
        lean.delete_message_batch(QueueUrl=missing, Entries=[{"Id": "1", "ReceiptHandle": "r"}])
    with pytest.raises(ClientError) as boto_raised:
        sqs.delete_message_batch(QueueUrl=missing, Entries=[{"Id": "1", "ReceiptHandle": "r"}])
    assert error_code(lean_raised.value) == error_code(boto_raised.value)


def test_without_resending_a_refused_connection_is_a_transient_botocore_error():
    lean = lean_client(f"http://127.0.0.1:{free_port()}", resend=False)
    with pytest.raises(EndpointConnectionError) as raised:
        lean.receive_message(QueueUrl="http://q", WaitTimeSeconds=0)
    assert is_transient(raised.value)


def test_other_attributes_are_the_boto3_clients(sqs, endpoint):
    lean = lean_client(endpoint)
    url = lean.create_queue(QueueName="lean-other")["QueueUrl"]
    assert lean.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ].endswith("lean-other")
    assert lean.exceptions.QueueDoesNotExist is not None


def test_a_botocore_without_the_internals_falls_back_to_plain_boto3_with_one_warning(
    endpoint, caplog
):
    client = sqs_client(AwsOptions(region="us-east-1", endpoint_url=endpoint))
    del client._endpoint.http_session  # as a botocore release that renamed it would look
    assert lean_or_plain(client) is client
    [line] = [r for r in caplog.records if "falling back to plain boto3" in r.getMessage()]
    assert "http_session" in line.error


def test_the_fallback_warns_once_per_process_not_once_per_client(endpoint, caplog, monkeypatch):
    """The daemon builds a receive client and an acks client: one botocore upgrade, one
    warning (and a credentials object without get_frozen_credentials counts as missing)."""
    monkeypatch.setattr(dataplane, "_has_warned", False)
    clients = [sqs_client(AwsOptions(region="us-east-1", endpoint_url=endpoint)) for _ in range(2)]
    del clients[0]._endpoint.http_session
    clients[1]._request_signer._credentials = object()  # a credentials type we cannot read
    assert [lean_or_plain(client) for client in clients] == clients
    lines = [r for r in caplog.records if "falling back to plain boto3" in r.getMessage()]
    assert len(lines) == 1, [r.error for r in lines]


# -- the direct transport: own signing, one persistent connection per thread ---------------


class KeepAlive(BaseHTTPRequestHandler):
    """HTTP/1.1, answers `{}`; records each request's connection number and access key.
    With `drop_after_answer` it closes every connection after one answer without saying so,
    as a server does with a connection idle past its timeout."""

    protocol_version = "HTTP/1.1"
    connections: ClassVar[int] = 0
    seen: ClassVar[list[tuple[int, str]]] = []
    drop_after_answer: ClassVar[bool] = False
    chunked: ClassVar[bool] = False

    def setup(self) -> None:
        super().setup()
        type(self).connections += 1
        self.number = type(self).connections

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        authorization = self.headers.get("Authorization", "")
        key = authorization.split("Credential=", 1)[-1].split("/", 1)[0]
        type(self).seen.append((self.number, key))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-amz-json-1.0")
        if type(self).chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b'5\r\n{"a":\r\n3;ext=1\r\n"b"\r\n1\r\n}\r\n0\r\n\r\n')
        else:
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
        if type(self).drop_after_answer:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def keepalive_sqs() -> Iterator[str]:
    KeepAlive.connections = 0
    KeepAlive.seen = []
    KeepAlive.drop_after_answer = False
    KeepAlive.chunked = False
    server = ThreadingHTTPServer(("127.0.0.1", 0), KeepAlive)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="keepalive-sqs", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def direct(lean: LeanSqs) -> leanhttp.DirectTransport:
    transport = lean.transport
    assert isinstance(transport, leanhttp.DirectTransport)
    return transport


def test_moto_accepts_the_direct_transports_requests(sqs, endpoint):
    """moto does not check signatures (test_sigv4 compares ours with botocore's); this is
    the wire format: body, target, headers, answers."""
    url = sqs.create_queue(QueueName="lean-direct")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="x")
    lean = lean_client(endpoint)
    [message] = lean.receive_message(QueueUrl=url, WaitTimeSeconds=0)["Messages"]
    entry = {"Id": "1", "ReceiptHandle": message["ReceiptHandle"]}
    assert lean.delete_message_batch(QueueUrl=url, Entries=[entry])["Successful"] == [{"Id": "1"}]
    assert direct(lean).connects >= 1
    lean.close()


def test_a_thread_keeps_one_connection_for_its_calls(keepalive_sqs):
    lean = lean_client(keepalive_sqs)
    for _ in range(5):
        lean.delete_message_batch(QueueUrl="http://q", Entries=[{"Id": "1", "ReceiptHandle": "r"}])
    other = threading.Thread(
        target=lambda: lean.receive_message(QueueUrl="http://q"), name="test-other-thread"
    )
    other.start()
    other.join(10)

    assert [number for number, _ in KeepAlive.seen] == [1] * 5 + [2]  # one per thread
    assert KeepAlive.connections == 2
    assert direct(lean).connects == 2
    lean.close()


def test_a_connection_the_server_closed_is_reopened_and_the_request_sent_again(keepalive_sqs):
    stats = Stats()
    lean = lean_client(keepalive_sqs, stats, resend=False)
    KeepAlive.drop_after_answer = True
    for _ in range(3):
        assert lean.receive_message(QueueUrl="http://q") == {}

    # Each call after the first found its connection closed and went out on a new one,
    # without an error and without boto3's resend (resend=False would have raised).
    assert [number for number, _ in KeepAlive.seen] == [1, 2, 3]
    assert counted(stats) == {("sqs", "ReceiveMessage", "ok"): 3}
    lean.close()


class Rotating:
    """A credentials source whose keys change between calls, as refreshable ones do."""

    def __init__(self) -> None:
        self.generation = 0

    def get_frozen_credentials(self) -> Any:
        from botocore.credentials import ReadOnlyCredentials

        self.generation += 1
        return ReadOnlyCredentials(f"AKID{self.generation}", f"secret{self.generation}", None)


def test_rotated_credentials_are_used_by_the_next_request(keepalive_sqs):
    client = sqs_client(AwsOptions(region="us-east-1", endpoint_url=keepalive_sqs))
    client._request_signer._credentials = Rotating()
    lean = LeanSqs(client)
    for _ in range(3):
        lean.receive_message(QueueUrl="http://q")
    assert [key for _, key in KeepAlive.seen] == ["AKID1", "AKID2", "AKID3"]
    lean.close()


def test_a_proxy_sends_through_botocores_session_with_one_warning(endpoint, caplog, monkeypatch):
    monkeypatch.setattr(dataplane, "_has_warned_session", False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # never reached: no call is made
    options = AwsOptions(region="us-east-1", endpoint_url=endpoint)
    leans = [LeanSqs(sqs_client(options)) for _ in range(2)]
    assert all(isinstance(lean.transport, leanhttp.SessionTransport) for lean in leans)
    lines = [r for r in caplog.records if "botocore's HTTP session" in r.getMessage()]
    assert [line.reason for line in lines] == ["a proxy is configured"]


def test_a_chunked_answer_is_read_whole_and_the_connection_kept(keepalive_sqs):
    KeepAlive.chunked = True
    lean = lean_client(keepalive_sqs)
    assert lean.delete_message_batch(QueueUrl="http://q", Entries=[]) == {"a": "b"}
    assert lean.delete_message_batch(QueueUrl="http://q", Entries=[]) == {"a": "b"}
    assert KeepAlive.connections == 1
    lean.close()


@pytest.fixture
def tls_sqs(tmp_path) -> Iterator[tuple[str, str]]:
    """The keep-alive stub over TLS with a self-signed certificate for 127.0.0.1:
    (endpoint, the certificate's path, to be trusted as a CA bundle)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    files = ["-keyout", str(key), "-out", str(cert)]
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            *files,
            *subject,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    KeepAlive.connections = 0
    KeepAlive.seen = []
    KeepAlive.drop_after_answer = False
    KeepAlive.chunked = False
    server = ThreadingHTTPServer(("127.0.0.1", 0), KeepAlive)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="tls-sqs", daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", str(cert)
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_tls_verifies_against_the_configured_ca_bundle(tls_sqs, monkeypatch):
    endpoint, cert = tls_sqs
    monkeypatch.setenv("AWS_CA_BUNDLE", cert)  # botocore's verify setting, as users set it
    lean = lean_client(endpoint, resend=False)
    assert lean.receive_message(QueueUrl="http://q") == {}
    assert lean.receive_message(QueueUrl="http://q") == {}
    assert KeepAlive.connections == 1  # kept alive over TLS too
    lean.close()


def test_tls_refuses_a_certificate_the_client_would_not_trust(tls_sqs):
    endpoint, _ = tls_sqs
    lean = lean_client(endpoint, resend=False)
    with pytest.raises(SSLError):
        lean.receive_message(QueueUrl="http://q")
    assert KeepAlive.seen == []  # nothing was sent
