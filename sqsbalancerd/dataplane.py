"""A lean path for the three SQS calls the engine makes per message.

botocore spends about a millisecond of CPU on every call (parameter validation, a dozen
event hooks, user-agent assembly, response parsing through the service model); at 1,000
idle queues that alone is 5 % of a core, and under load it is most of the daemon's CPU. The
engine's hot calls — ReceiveMessage, DeleteMessageBatch, ChangeMessageVisibilityBatch — have
fixed, simple shapes, so `LeanSqs` sends them itself: the JSON protocol body, signed by
`sigv4.Signer` (the derived key cached per secret and day) with the boto3 client's own
credentials (refreshed as they expire, read through `get_frozen_credentials()` per call), to
the client's resolved endpoint, over one persistent HTTP/1.1 connection per thread
(`leanhttp.DirectTransport`: the client's connect and read timeouts, TCP keep-alive, and TLS
verified as the client verifies, against botocore's CA bundle or the configured file). A
connection the server closed while idle is reopened and the request sent once more. What that
transport cannot do — a proxy, a client certificate, a CA directory — goes through the
client's own HTTP session and botocore's signer instead (`SessionTransport`, decided at
construction, one warning).

Anything that is not a plain 200 — an error response, a timeout, a dropped connection — is
sent again through the boto3 client, which retries with its configured mode and raises the
usual `ClientError`; callers see exactly what boto3 would have given them. (The poller's
`before-send` hook checks the receive budget before each of those attempts: a fenced
instance's fallback or retry raises `ReceiveFenced` instead of polling.) A caller that
retries on its own (the acks thread) asks for `resend_errors=False` instead: the failure is
raised at once as the `ClientError` or botocore connection error boto3 would raise. Every
other attribute is the boto3 client's. Off with `sqs.lean_requests = false`.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit, urlunsplit

import botocore
from botocore.exceptions import BotoCoreError, ClientError

from sqsbalancerd import leanhttp
from sqsbalancerd.aws import USER_AGENT_PRODUCT, outcome_for_status
from sqsbalancerd.leanhttp import Answer
from sqsbalancerd.stats import Stats

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

logger = logging.getLogger(__name__)

_TARGET_PREFIX = "AmazonSQS."
_ENCODER = json.JSONEncoder(separators=(",", ":"))  # one, not one per json.dumps call
_HEADERS = {
    "Content-Type": "application/x-amz-json-1.0",
    # As botocore sends for SQS (awsQueryCompatible): errors carry the query-API codes.
    "x-amzn-query-mode": "true",
    "User-Agent": f"{USER_AGENT_PRODUCT} Botocore/{botocore.__version__} lean",
}


class LeanUnavailable(Exception):
    """The botocore internals the lean path reads are not there (a botocore upgrade)."""


def lean_or_plain(
    client: SQSClient, stats: Stats | None = None, *, resend_errors: bool = True
) -> SQSClient:
    """The lean client, or the boto3 client itself (one warning) when this botocore does not
    have what the lean path reads: a botocore upgrade must slow the daemon, not stop it."""
    global _has_warned
    try:
        return cast("SQSClient", LeanSqs(client, stats, resend_errors=resend_errors))
    except LeanUnavailable as exc:
        if not _has_warned:  # the daemon builds two SQS clients: one upgrade, one warning
            _has_warned = True
            logger.warning(
                "sqs.lean_requests: falling back to plain boto3 calls",
                extra={"error": str(exc), "botocore": botocore.__version__},
            )
        return client


_has_warned = False
_has_warned_session = False


def _transport(client: Any, url: str, http_session: Any) -> leanhttp.Transport:
    """Direct when it can be, else botocore's session (one warning per process: the daemon
    builds two SQS clients with the same settings)."""
    global _has_warned_session
    transport, why = leanhttp.choose(client, url, http_session)
    if why is not None and not _has_warned_session:
        _has_warned_session = True
        logger.warning(
            "sqs.lean_requests: sending through botocore's HTTP session", extra={"reason": why}
        )
    return transport


class LeanSqs:
    """The boto3 SQS client, with receive and the two batch calls sent without botocore's
    per-call machinery, through the client's own HTTP session (its proxies, CA bundle,
    timeouts and connection pool)."""

    def __init__(
        self, client: SQSClient, stats: Stats | None = None, *, resend_errors: bool = True
    ) -> None:
        self._client = client
        self._stats = stats
        self._resend_errors = resend_errors
        self._url = _request_url(client.meta.endpoint_url)
        self._region = client.meta.region_name
        # botocore internals, stable for years: the credentials the client signs with
        # (refreshable ones renew in get_frozen_credentials) and its HTTP session.
        try:
            self._credentials = client._request_signer._credentials  # type: ignore[attr-defined]
            self._http = client._endpoint.http_session  # type: ignore[attr-defined]
        except AttributeError as exc:
            raise LeanUnavailable(f"botocore internals missing: {exc}") from None
        if not callable(getattr(self._http, "send", None)):
            raise LeanUnavailable("botocore's HTTP session has no send()")
        readable = callable(getattr(self._credentials, "get_frozen_credentials", None))
        if self._credentials is not None and not readable:
            raise LeanUnavailable("botocore's credentials have no get_frozen_credentials()")
        self._transport = _transport(client, self._url, self._http)

    @property
    def transport(self) -> leanhttp.Transport:
        return self._transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def receive_message(self, **params: Any) -> dict[str, Any]:
        response = self._call("ReceiveMessage", params, self._client.receive_message)
        for message in response.get("Messages", ()):
            _decode_blobs(message.get("MessageAttributes"))
        return response

    def delete_message_batch(self, **params: Any) -> dict[str, Any]:
        return self._call("DeleteMessageBatch", params, self._client.delete_message_batch)

    def change_message_visibility_batch(self, **params: Any) -> dict[str, Any]:
        return self._call(
            "ChangeMessageVisibilityBatch", params, self._client.change_message_visibility_batch
        )

    def _call(
        self, action: str, params: dict[str, Any], fallback: Callable[..., Any]
    ) -> dict[str, Any]:
        if self._credentials is None:  # boto3 raises NoCredentialsError, as users expect
            return dict(fallback(**params))
        try:
            response = self._send(action, params)
        except BotoCoreError:  # the session maps network failures to botocore's errors
            if not self._resend_errors:
                self._record(action, "network_error")
                raise
            # boto3 retries, raises as usual and counts the call's outcome once: as with its
            # own retries, an attempt that failed before is not a failure of its own.
            return dict(fallback(**params))
        if response.status_code != 200:
            if not self._resend_errors:
                self._record(action, outcome_for_status(response.status_code, response.content))
                raise _client_error(action, response)
            return dict(fallback(**params))
        self._record(action, "ok")
        parsed: dict[str, Any] = json.loads(response.content.decode()) if response.content else {}
        return parsed

    def _send(self, action: str, params: dict[str, Any]) -> Answer:
        body = _ENCODER.encode(params).encode()
        headers = {**_HEADERS, "X-Amz-Target": _TARGET_PREFIX + action}
        return self._transport.send(self._credentials.get_frozen_credentials(), headers, body)

    def close(self) -> None:
        """Close this thread's persistent connection (others close with their threads)."""
        self._transport.close()

    def _record(self, action: str, outcome: str) -> None:
        if self._stats is not None:
            self._stats.aws_call("sqs", action, outcome)


def _request_url(endpoint_url: str) -> str:
    """Where botocore posts a JSON-protocol call: the endpoint, with "/" when it has no path."""
    parts = urlsplit(endpoint_url)
    return urlunsplit(parts._replace(path=parts.path or "/"))


def _client_error(action: str, response: Answer) -> ClientError:
    """The ClientError boto3 would raise: SQS's query-compatible code when it sends one."""
    try:
        body = json.loads(response.content or b"{}")
    except ValueError:
        body = {}
    query_error = response.headers.get("x-amzn-query-error", "")
    code = query_error.split(";")[0] or str(body.get("__type", "")).rsplit("#", 1)[-1]
    message = body.get("message") or body.get("Message") or ""
    parsed: Any = {
        "Error": {"Code": code or str(response.status_code), "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": response.status_code},
    }
    return ClientError(parsed, action)


def _decode_blobs(attributes: dict[str, Any] | None) -> None:
    """As botocore does: binary attribute values arrive base64-encoded, callers get bytes."""
    for value in (attributes or {}).values():
        if "BinaryValue" in value:
            value["BinaryValue"] = base64.b64decode(value["BinaryValue"])
        if "BinaryListValues" in value:
            value["BinaryListValues"] = [base64.b64decode(v) for v in value["BinaryListValues"]]
