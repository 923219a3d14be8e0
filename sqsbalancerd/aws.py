"""boto3 client factories: one client per service, shared by threads, calls counted.

Only this module calls boto3.client. `endpoint_url` is passed only when configured so
AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_SQS and AWS_ENDPOINT_URL_DYNAMODB keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from sqsbalancerd.stats import Stats

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_sqs import SQSClient

THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "SlowDown",
        "OverLimit",
    }
)

# Seconds a long poll may take beyond WaitTimeSeconds before the read is considered hung.
LONG_POLL_READ_MARGIN_S = 10.0


# Named in every request's User-Agent, so AWS-side logs (CloudTrail) show who called.
def _own_version() -> str:
    try:
        return version("sqsbalancerd")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


USER_AGENT_PRODUCT = f"sqsbalancerd/{_own_version()}"


@dataclass(frozen=True, slots=True)
class AwsOptions:
    region: str
    endpoint_url: str | None = None
    max_pool_connections: int = 50
    retry_mode: str = "standard"
    max_attempts: int = 5
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 20.0 + LONG_POLL_READ_MARGIN_S
    # Only for the local emulator: real deployments use the default credential chain.
    access_key_id: str | None = None
    secret_access_key: str | None = None


def _boto_config(options: AwsOptions) -> BotoConfig:
    return BotoConfig(
        region_name=options.region,
        user_agent_extra=USER_AGENT_PRODUCT,
        retries={"mode": options.retry_mode, "total_max_attempts": options.max_attempts},  # type: ignore[arg-type]
        connect_timeout=options.connect_timeout_s,
        read_timeout=options.read_timeout_s,
        max_pool_connections=options.max_pool_connections,
        tcp_keepalive=True,
    )


def _client(service: str, options: AwsOptions, stats: Stats | None) -> Any:
    kwargs: dict[str, Any] = {"config": _boto_config(options)}
    if options.endpoint_url:
        kwargs["endpoint_url"] = options.endpoint_url
    if options.access_key_id:
        kwargs["aws_access_key_id"] = options.access_key_id
        kwargs["aws_secret_access_key"] = options.secret_access_key
    client = boto3.session.Session().client(service, **kwargs)  # type: ignore[call-overload]
    if stats is not None:
        _count_calls(client, service, stats)
    return client


def sqs_client(options: AwsOptions, stats: Stats | None = None) -> SQSClient:
    client: SQSClient = _client("sqs", options, stats)
    return client


def dynamodb_client(options: AwsOptions, stats: Stats | None = None) -> DynamoDBClient:
    client: DynamoDBClient = _client("dynamodb", options, stats)
    return client


def _count_calls(client: Any, service: str, stats: Stats) -> None:
    """Record every logical call (after botocore's own retries) with its outcome."""

    def after_call(http_response: Any, model: Any, **_: Any) -> None:
        status = getattr(http_response, "status_code", 0)
        body = getattr(http_response, "content", b"") or b""
        stats.aws_call(service, model.name, outcome_for_status(status, body))

    def after_call_error(exception: Exception, context: Any, **_: Any) -> None:
        action = context.get("operation_name") if isinstance(context, dict) else None
        stats.aws_call(service, action or "unknown", "network_error")

    events = client.meta.events
    events.register("after-call", after_call)
    events.register("after-call-error", after_call_error)
    events.register("before-call", _remember_operation)


def _remember_operation(model: Any, context: Any, **_: Any) -> None:
    context["operation_name"] = model.name


def outcome_for_status(status: int, body: bytes) -> str:
    """How a response counts in the call metrics: ok, throttled, server or client error."""
    if status < 300:
        return "ok"
    if status == 429 or status >= 500:
        return "throttled" if status in (429, 503) else "server_error"
    if any(code.encode() in body for code in THROTTLING_CODES):
        return "throttled"
    return "client_error"


def error_code(exc: BaseException) -> str | None:
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return str(code) if code else None
    return None


def is_transient(exc: BaseException) -> bool:
    """Throttling, 5xx and network failures: worth retrying later."""
    if isinstance(exc, BotoConnectionError | BotoCoreError) and not isinstance(exc, ClientError):
        return True
    if isinstance(exc, ClientError):
        code = error_code(exc) or ""
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in THROTTLING_CODES or status >= 500 or code == "ServiceUnavailable"
    return False


def describe_error(exc: BaseException) -> str:
    """A short, body-free description of an AWS failure for logs and fatal lines."""
    code = error_code(exc)
    if code:
        return f"{code}: {exc.response['Error'].get('Message', '')}".strip()  # type: ignore[attr-defined]
    return f"{type(exc).__name__}: {exc}"
