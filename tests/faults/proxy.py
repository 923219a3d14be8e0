"""A fault-injecting HTTP proxy on loopback, between `sqsbalancerd run` and the moto server.

moto cannot throttle, drop connections or fail part of a batch, and it serves SQS and
DynamoDB from one endpoint; so the daemons under test reach it through this proxy
(`AWS_ENDPOINT_URL_SQS` / `AWS_ENDPOINT_URL_DYNAMODB` = `proxy.url`, see `proxy.env()`), and
the test sets rules at run time:

    proxy.add(Rule("sqs", "ReceiveMessage", throttle("sqs"), period=5, burst=2))
    proxy.add(Rule("dynamodb", None, Blackhole()))          # this instance loses DynamoDB
    proxy.clear("dynamodb")                                  # ... and gets it back

A request matches a rule by service (from the `X-Amz-Target` prefix: "AmazonSQS." or
"DynamoDB_20120810.") and action. Each rule counts the requests it saw and injects on
those whose index `i` has `i % period < burst`, until its `times` budget is spent; the
first rule that injects decides, the others never see that request. Every request is
recorded (`proxy.records()`) with its wall-clock start and end, the botocore invocation id
and attempt number (retries of one call share the id), the SQS queue or DynamoDB key, the
message ids a ReceiveMessage returned, and the fault injected, so tests can tell when an
instance last received, when its last heartbeat got through, and how calls were retried.

Faults:
- `Drop()`: read the request, close the connection without answering (reset=True: RST).
- `Blackhole(hold_s)`: never answer (the client's read timeout fires), close after hold_s.
- `ErrorReply(status, code, ...)`: an AWS JSON-protocol error, e.g. `throttle("sqs")`,
  `throttle("dynamodb")`, `server_error(503)`; not forwarded (nothing happened upstream).
- `LostReply(status)`: forwarded (it happened upstream), the answer replaced by an error.
- `Latency(delay_s)`: forwarded after a delay.
- `FailEntries(code, sender_fault, per_batch)`: for DeleteMessageBatch /
  ChangeMessageVisibilityBatch, remove up to `per_batch` entries from the forwarded request
  (so they really are not done) and report them under "Failed" with `code`.
`proxy.refuse()` / `proxy.accept()` stop and restart listening on the same port
(connection refused in between; open connections are cut).
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

SERVICE_PREFIXES = {"AmazonSQS": "sqs", "DynamoDB_20120810": "dynamodb"}
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
    }
)


# -- faults -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drop:
    reset: bool = False

    def describe(self) -> str:
        return "reset" if self.reset else "drop"


@dataclass(frozen=True)
class Blackhole:
    hold_s: float = 30.0

    def describe(self) -> str:
        return "blackhole"


@dataclass(frozen=True)
class ErrorReply:
    """An error as AWS JSON-protocol services send it: `{"__type": ..., "message": ...}`.

    `query_error` fills the `x-amzn-query-error: <code>;<Sender|Receiver>` header that SQS
    (an "awsQueryCompatible" service) adds; botocore then reports that code.
    """

    status: int
    code: str
    message: str = "injected by the fault proxy"
    namespace: str = ""
    query_error: str | None = None

    def describe(self) -> str:
        return f"{self.status} {self.code}"

    def body(self) -> bytes:
        type_name = f"{self.namespace}#{self.code}" if self.namespace else self.code
        return json.dumps({"__type": type_name, "message": self.message}).encode()


@dataclass(frozen=True)
class LostReply:
    status: int = 500

    def describe(self) -> str:
        return f"lost reply ({self.status})"


@dataclass(frozen=True)
class Latency:
    delay_s: float

    def describe(self) -> str:
        return f"latency {self.delay_s:g}s"


@dataclass(frozen=True)
class FailEntries:
    """Fail up to `per_batch` entries of a batch, never twice for one message (so a retried
    entry goes through: the counts stay exact)."""

    code: str = "InternalError"
    sender_fault: bool = False
    per_batch: int = 1

    def describe(self) -> str:
        return f"failed entries ({self.code})"


Fault = Drop | Blackhole | ErrorReply | LostReply | Latency | FailEntries


def throttle(service: str) -> ErrorReply:
    """What throttling looks like from each service (HTTP 400, retried by botocore)."""
    if service == "sqs":
        return ErrorReply(
            400,
            "RequestThrottled",
            "Request is throttled.",
            namespace="com.amazonaws.sqs",
            query_error="RequestThrottled;Sender",
        )
    return ErrorReply(
        400,
        "ProvisionedThroughputExceededException",
        "The level of configured provisioned throughput for the table was exceeded.",
        namespace="com.amazonaws.dynamodb.v20120810",
    )


def throttling_exception() -> ErrorReply:
    """The generic ThrottlingException (any JSON service, no query-compatible header)."""
    return ErrorReply(400, "ThrottlingException", "Rate exceeded")


def server_error(status: int = 500) -> ErrorReply:
    code = "ServiceUnavailable" if status == 503 else "InternalFailure"
    return ErrorReply(status, code, "injected server error")


# -- rules and records --------------------------------------------------------------------


@dataclass
class Rule:
    service: str  # "sqs", "dynamodb" or "*"
    action: str | None  # e.g. "ReceiveMessage"; None: every action of the service
    fault: Fault
    times: int | None = None  # injections allowed; None: unlimited
    period: int = 1
    burst: int = 1
    queue: str | None = None  # SQS only: just this queue's requests
    seen: int = 0
    injected: int = 0
    entries_failed: int = 0
    message_ids: list[str] = field(default_factory=list)  # entries failed / replies lost

    def matches(self, service: str, action: str, queue: str | None) -> bool:
        return (
            self.service in ("*", service)
            and self.action in (None, action)
            and self.queue in (None, queue)
        )

    def decide(self) -> bool:
        """Count one matching request; True when this one gets the fault."""
        if self.times is not None and self.injected >= self.times:
            return False
        index = self.seen
        self.seen += 1
        if index % self.period >= self.burst:
            return False
        self.injected += 1
        return True


@dataclass
class Record:
    started: float
    service: str
    action: str
    invocation: str
    attempt: int
    queue: str | None = None  # SQS: queue name
    key: str | None = None  # DynamoDB: the sort key written or read (member#…, queue#…)
    entries: int = 0  # batch entries sent by the client
    ended: float = 0.0
    status: int | None = None  # None: no HTTP answer (dropped, blackholed)
    fault: str | None = None
    # ReceiveMessage: what the client got; batch calls: the messages of the entries sent.
    message_ids: tuple[str, ...] = ()
    receipts: tuple[str, ...] = ()  # batch calls: the entries' receipt handles
    failed_ids: tuple[str, ...] = ()  # batch calls: messages whose entries FailEntries failed


# -- the server ---------------------------------------------------------------------------


class FaultProxy:
    def __init__(self, upstream: str, *, name: str = "proxy") -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.name = name
        self.port = 0
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._records: list[Record] = []
        self._receipts: dict[str, str] = {}  # receipt handle -> message id
        self._sockets: set[socket.socket] = set()
        self._released = threading.Event()  # wakes blackholed requests on clear/stop
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, services: tuple[str, ...] = ("sqs", "dynamodb")) -> dict[str, str]:
        """Environment pointing a daemon's clients for `services` at this proxy."""
        return {f"AWS_ENDPOINT_URL_{service.upper()}": self.url for service in services}

    def start(self) -> FaultProxy:
        handler = type("Handler", (_Handler,), {"proxy": self})
        server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._released.clear()
        self._thread = threading.Thread(
            target=server.serve_forever, name=f"fault-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        self._released.set()
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _cut(sock, reset=True)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def refuse(self) -> None:
        """Stop listening (connections refused) and cut open connections."""
        self.stop()

    def accept(self) -> None:
        """Listen again on the same port."""
        self.start()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- rules

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
            self._released.clear()
        return rule

    def clear(self, service: str | None = None) -> None:
        """Remove every rule (or those of one service); blackholed requests are let go."""
        with self._lock:
            self._rules = [r for r in self._rules if service is not None and r.service != service]
            self._released.set()

    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    def _choose(self, record: Record) -> tuple[Rule | None, Fault | None]:
        with self._lock:
            for rule in self._rules:
                if rule.matches(record.service, record.action, record.queue) and rule.decide():
                    return rule, rule.fault
        return None, None

    # -- records

    def records(self, service: str | None = None, action: str | None = None) -> list[Record]:
        with self._lock:
            return [
                r
                for r in self._records
                if (service is None or r.service == service)
                and (action is None or r.action == action)
            ]

    def counts(self) -> Counter[tuple[str, str, str]]:
        """(service, action, outcome) -> requests; outcome is "ok", the status or the fault."""
        counter: Counter[tuple[str, str, str]] = Counter()
        for record in self.records():
            outcome = record.fault or ("ok" if record.status == 200 else str(record.status))
            counter[(record.service, record.action, outcome)] += 1
        return counter

    def _record(self, record: Record) -> None:
        with self._lock:
            self._records.append(record)

    def _learn_receipts(self, messages: list[dict[str, Any]]) -> tuple[str, ...]:
        with self._lock:
            for message in messages:
                self._receipts[message["ReceiptHandle"]] = message["MessageId"]
        return tuple(m["MessageId"] for m in messages)

    def message_id_for(self, receipt_handle: str) -> str | None:
        with self._lock:
            return self._receipts.get(receipt_handle)

    def _track(self, sock: socket.socket, *, is_open: bool) -> None:
        with self._lock:
            if is_open:
                self._sockets.add(sock)
            else:
                self._sockets.discard(sock)


def _cut(sock: socket.socket, *, reset: bool) -> None:
    try:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"
    _upstream: HTTPConnection | None = None

    def setup(self) -> None:
        super().setup()
        self.proxy._track(self.connection, is_open=True)

    def finish(self) -> None:
        self.proxy._track(self.connection, is_open=False)
        if self._upstream is not None:
            self._upstream.close()
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the records are the log."""

    def do_GET(self) -> None:
        self._forward_plain(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        target = self.headers.get("X-Amz-Target", "")
        prefix, _, action = target.partition(".")
        service = SERVICE_PREFIXES.get(prefix)
        if service is None:
            self._forward_plain(body)
            return
        record = _new_record(service, action, self.headers, body)
        record.message_ids = tuple(self.proxy.message_id_for(h) or "?" for h in record.receipts)
        rule, fault = self.proxy._choose(record)
        record.fault = fault.describe() if fault is not None else None
        try:
            self._apply(record, rule, fault, body)
        finally:
            record.ended = time.time()
            self.proxy._record(record)

    # -- faults

    def _apply(self, record: Record, rule: Rule | None, fault: Fault | None, body: bytes) -> None:
        if isinstance(fault, Drop):
            self.close_connection = True
            _cut(self.connection, reset=fault.reset)
        elif isinstance(fault, Blackhole):
            self.close_connection = True
            self.proxy._released.wait(fault.hold_s)
            _cut(self.connection, reset=True)
        elif isinstance(fault, ErrorReply):
            record.status = fault.status
            headers = {"Content-Type": "application/x-amz-json-1.0"}
            if fault.query_error:
                headers["x-amzn-query-error"] = fault.query_error
            self._reply(fault.status, headers, fault.body())
        elif isinstance(fault, LostReply):
            status, _, reply = self._exchange(body)
            ids = self._received_ids(record, status, reply)
            if rule is not None:
                with self.proxy._lock:
                    rule.message_ids.extend(ids)
            record.status = fault.status
            error = server_error(fault.status)
            self._reply(fault.status, {"Content-Type": "application/x-amz-json-1.0"}, error.body())
        elif isinstance(fault, FailEntries) and rule is not None:
            self._fail_entries(record, rule, fault, body)
        else:
            if isinstance(fault, Latency):
                time.sleep(fault.delay_s)
            self._pass(record, body)

    def _pass(self, record: Record, body: bytes) -> None:
        status, headers, reply = self._exchange(body)
        record.status = status
        if record.action == "ReceiveMessage":
            record.message_ids = self._received_ids(record, status, reply)
        self._reply(status, headers, reply)

    def _received_ids(self, record: Record, status: int, reply: bytes) -> tuple[str, ...]:
        if status != 200 or record.action != "ReceiveMessage":
            return ()
        return self.proxy._learn_receipts(json.loads(reply or b"{}").get("Messages", []))

    def _fail_entries(self, record: Record, rule: Rule, fault: FailEntries, body: bytes) -> None:
        request = json.loads(body)
        entries = request.get("Entries", [])
        with self.proxy._lock:
            done = set(rule.message_ids)
        fresh = [e for e in entries if self.proxy.message_id_for(e["ReceiptHandle"]) not in done]
        failing = fresh[: fault.per_batch]
        if not failing:  # nothing left to fail here: pass it on, uncounted
            with self.proxy._lock:
                rule.injected -= 1
            record.fault = None
            self._pass(record, body)
            return
        kept = [e for e in entries if e not in failing]
        failed = [
            {
                "Id": entry["Id"],
                "SenderFault": fault.sender_fault,
                "Code": fault.code,
                "Message": "injected by the fault proxy",
            }
            for entry in failing
        ]
        if kept:
            request["Entries"] = kept
            status, headers, reply = self._exchange(json.dumps(request).encode())
            if status != 200:
                record.status = status
                self._reply(status, headers, reply)
                return
            response = json.loads(reply)
        else:
            status, headers, response = 200, {"Content-Type": "application/x-amz-json-1.0"}, {}
        response.setdefault("Successful", [])
        response["Failed"] = [*response.get("Failed", []), *failed]
        ids = [self.proxy.message_id_for(e["ReceiptHandle"]) or "?" for e in failing]
        record.failed_ids = tuple(ids)
        with self.proxy._lock:
            rule.entries_failed += len(failed)
            rule.message_ids.extend(ids)
        record.status = 200
        headers.pop("x-amz-crc32", None)
        self._reply(200, headers, json.dumps(response).encode())

    # -- plumbing

    def _exchange(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send this request upstream (one kept-alive connection per client connection)."""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Connection"] = "keep-alive"
        headers["Content-Length"] = str(len(body))
        for attempt in range(2):
            if self._upstream is None:
                self._upstream = HTTPConnection(
                    self.proxy.upstream_host, self.proxy.upstream_port, timeout=120
                )
            try:
                self._upstream.request(self.command, self.path, body=body, headers=headers)
                response = self._upstream.getresponse()
                reply = response.read()
            except (OSError, HTTPException):
                self._upstream.close()
                self._upstream = None
                if attempt:
                    raise
                continue
            kept = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
            return response.status, kept, reply
        raise AssertionError("unreachable")

    def _forward_plain(self, body: bytes) -> None:
        status, headers, reply = self._exchange(body)
        self._reply(status, headers, reply)

    def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        try:
            self.send_response_only(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.close_connection = True


def _new_record(service: str, action: str, headers: Any, body: bytes) -> Record:
    attempt_header = headers.get("amz-sdk-request", "")  # "attempt=2; max=5"
    attempt = 1
    for part in attempt_header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == "attempt" and value.isdigit():
            attempt = int(value)
    record = Record(
        started=time.time(),
        service=service,
        action=action,
        invocation=headers.get("amz-sdk-invocation-id", ""),
        attempt=attempt,
    )
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        return record
    url = request.get("QueueUrl")
    if isinstance(url, str):
        record.queue = url.rstrip("/").rsplit("/", 1)[-1]
    entries = request.get("Entries", [])
    record.entries = len(entries)
    record.receipts = tuple(e.get("ReceiptHandle", "") for e in entries if isinstance(e, dict))
    key = request.get("Key") or request.get("Item") or {}
    if isinstance(key, dict) and "sk" in key:
        record.key = key["sk"].get("S")
    return record
