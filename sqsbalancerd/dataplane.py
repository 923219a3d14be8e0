"""A lean path for the three SQS calls the engine makes per message.

botocore spends about a millisecond of CPU on every call (parameter validation, a dozen
event hooks, user-agent assembly, response parsing through the service model); at 1,000
idle queues that alone is 5 % of a core, and under load it is most of the daemon's CPU. The
engine's hot calls — ReceiveMessage, DeleteMessageBatch, ChangeMessageVisibilityBatch — have
fixed, simple shapes, so `LeanSqs` sends them itself: the JSON protocol body, signed by
botocore's SigV4 signer with the boto3 client's own credentials (refreshed as they expire),
to the client's resolved endpoint, over one urllib3 pool with the client's timeouts.

Anything that is not a plain 200 — an error response, a timeout, a dropped connection — is
sent again through the boto3 client, which retries with its configured mode and raises the
usual `ClientError`; callers see exactly what boto3 would have given them. A caller that
retries on its own (the acks thread) asks for `resend_errors=False` instead: the failure is
raised at once as the `ClientError` or botocore connection error boto3 would raise. Every
other attribute is the boto3 client's. Off with `sqs.lean_requests = false`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import urllib3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    ReadTimeoutError,
)

from sqsbalancerd.aws import AwsOptions, outcome_for_status
from sqsbalancerd.stats import Stats

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

_TARGET_PREFIX = "AmazonSQS."
_CONTENT_TYPE = "application/x-amz-json-1.0"
_BLOB_FIELDS = ("BinaryValue",)
_BLOB_LIST_FIELDS = ("BinaryListValues",)


class LeanSqs:
    """The boto3 SQS client, with receive and the two batch calls sent without botocore."""

    def __init__(
        self,
        client: SQSClient,
        options: AwsOptions,
        stats: Stats | None = None,
        *,
        resend_errors: bool = True,
    ) -> None:
        self._client = client
        self._stats = stats
        self._resend_errors = resend_errors
        self._endpoint = client.meta.endpoint_url.rstrip("/") + "/"
        self._region = client.meta.region_name
        # The client's own credentials object: refreshable ones renew on get_frozen_credentials.
        self._credentials = client._request_signer._credentials  # type: ignore[attr-defined]
        self._pool = urllib3.PoolManager(
            maxsize=options.max_pool_connections,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(connect=options.connect_timeout_s, read=options.read_timeout_s),
        )

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

    def close(self) -> None:
        self._pool.clear()

    def _call(
        self, action: str, params: dict[str, Any], fallback: Callable[..., Any]
    ) -> dict[str, Any]:
        try:
            response = self._send(action, params)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            self._record(action, "network_error")
            if not self._resend_errors:
                raise self._connection_error(exc) from exc
            return dict(fallback(**params))  # boto3 retries and raises as usual
        if response.status != 200:
            self._record(action, outcome_for_status(response.status, response.data or b""))
            if not self._resend_errors:
                raise _client_error(action, response)
            return dict(fallback(**params))
        self._record(action, "ok")
        parsed: dict[str, Any] = json.loads(response.data) if response.data else {}
        return parsed

    def _send(self, action: str, params: dict[str, Any]) -> urllib3.BaseHTTPResponse:
        body = json.dumps(params, separators=(",", ":")).encode()
        request = AWSRequest(
            method="POST",
            url=self._endpoint,
            data=body,
            headers={"Content-Type": _CONTENT_TYPE, "X-Amz-Target": _TARGET_PREFIX + action},
        )
        credentials = self._credentials.get_frozen_credentials()
        SigV4Auth(credentials, "sqs", self._region).add_auth(request)
        return self._pool.request(
            "POST", self._endpoint, body=body, headers=dict(request.headers.items())
        )

    def _connection_error(self, exc: Exception) -> Exception:
        """The botocore exception boto3 raises for the same network failure."""
        # NewConnectionError subclasses urllib3's ConnectTimeoutError: test it first.
        if isinstance(exc, urllib3.exceptions.NewConnectionError | ConnectionRefusedError):
            return EndpointConnectionError(endpoint_url=self._endpoint, error=exc)
        if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
            return ConnectTimeoutError(endpoint_url=self._endpoint, error=exc)
        if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
            return ReadTimeoutError(endpoint_url=self._endpoint, error=exc)
        return HTTPClientError(error=exc)

    def _record(self, action: str, outcome: str) -> None:
        if self._stats is not None:
            self._stats.aws_call("sqs", action, outcome)


def _client_error(action: str, response: urllib3.BaseHTTPResponse) -> ClientError:
    """The ClientError boto3 would raise: SQS's query-compatible code when it sends one."""
    try:
        body = json.loads(response.data or b"{}")
    except ValueError:
        body = {}
    query_error = response.headers.get("x-amzn-query-error", "")
    code = query_error.split(";")[0] or str(body.get("__type", "")).rsplit("#", 1)[-1]
    message = body.get("message") or body.get("Message") or ""
    parsed: Any = {
        "Error": {"Code": code or str(response.status), "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": response.status},
    }
    return ClientError(parsed, action)


def _decode_blobs(attributes: dict[str, Any] | None) -> None:
    """As botocore does: binary attribute values arrive base64-encoded, callers get bytes."""
    for value in (attributes or {}).values():
        for field in _BLOB_FIELDS:
            if field in value:
                value[field] = base64.b64decode(value[field])
        for field in _BLOB_LIST_FIELDS:
            if field in value:
                value[field] = [base64.b64decode(item) for item in value[field]]
