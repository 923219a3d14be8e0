"""A start that meets a slow or throttled DynamoDB retries for a while before giving up.

Before, the first transient failure that outlasted botocore's two attempts ended the process
(exit 1), though it had consumed nothing: one slow answer during a big deploy cost a task
restart.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError, ReadTimeoutError
from moto import mock_aws
from support import FakeClock

from sqsbalancerd.config import CoordinationSettings
from sqsbalancerd.coordination import coordinator as coordinator_module
from sqsbalancerd.coordination.coordinator import DynamoCoordinator, ReceiveControl
from sqsbalancerd.coordination.table import CoordinationTable
from sqsbalancerd.errors import AwsUnavailableError

TABLE = "coordination"
REGION = "us-east-1"


class FailingFirst:
    """A DynamoDB client whose first `count` calls raise `error`; then the real client."""

    def __init__(self, client: Any, error: Exception, count: int) -> None:
        self._client, self._error, self.left = client, error, count
        self.failed: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method) or name.startswith("_") or name == "meta":
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.left > 0:
                self.left -= 1
                self.failed.append(name)
                raise self._error
            return method(*args, **kwargs)

        return call


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coordinator_module, "START_RETRY_DELAYS_S", (0.0, 0.0, 0.0), raising=False)


@pytest.fixture
def aws() -> Iterator[None]:
    with mock_aws():
        yield


def coordinator(client: Any) -> DynamoCoordinator:
    clock = FakeClock()
    table = CoordinationTable(client, table_name=TABLE, application="app", clock=clock)
    settings = CoordinationSettings(
        table_name=TABLE, heartbeat_interval=1.0, heartbeat_timeout=4.0, rebalance_delay=2.0
    )
    return DynamoCoordinator(
        table=table,
        settings=settings,
        instance_id="i-1",
        region=REGION,
        clock=clock,
        set_owned=lambda queues: None,
        control=ReceiveControl(pause=no_op, resume=no_op, set_budget=lambda *args: None),
        spawn=lambda name, run, stop: None,
        fail=lambda reason: None,
    )


def no_op() -> None:
    pass


def timeout() -> ReadTimeoutError:
    return ReadTimeoutError(endpoint_url="http://127.0.0.1:1/")


def members(client: Any) -> list[str]:
    table = CoordinationTable(client, table_name=TABLE, application="app", clock=FakeClock())
    return [m.instance_id for m in table.members()]


def test_a_start_whose_first_calls_time_out_joins_once_they_answer(aws, caplog):
    real = boto3.client("dynamodb", region_name=REGION)
    client = FailingFirst(real, timeout(), count=2)
    with caplog.at_level(logging.WARNING):
        coordinator(client).start()
    assert client.failed == ["describe_table", "describe_table"]
    assert members(real) == ["i-1"]
    retries = [r for r in caplog.records if r.getMessage() == "DynamoDB failed at start; retrying"]
    assert len(retries) == 2


def test_a_failed_step_after_registering_does_not_register_again(aws):
    """The join's row landed, the read after it timed out: the retry must not see its own row
    as another instance with the same id (and wait out a heartbeat timeout for it)."""
    real = boto3.client("dynamodb", region_name=REGION)
    client = FailingFirst(real, timeout(), count=0)
    node = coordinator(client)
    original = node._observe_members
    failures = iter([True])

    def observe_once_failing() -> None:
        if next(failures, False):
            raise timeout()
        original()

    node._observe_members = observe_once_failing  # type: ignore[method-assign]
    node.start()
    assert members(real) == ["i-1"]
    assert node._membership.counter == 1  # registered once, not taken over


def test_a_start_that_keeps_timing_out_ends_with_one_clear_error(aws):
    real = boto3.client("dynamodb", region_name=REGION)
    client = FailingFirst(real, timeout(), count=100)
    with pytest.raises(AwsUnavailableError, match='DynamoDB unreachable \\(table "coordination"'):
        coordinator(client).start()
    assert len(client.failed) == 4  # the first attempt and the three retries


def test_a_refusal_is_not_retried(aws):
    denied = ClientError(
        {"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "DescribeTable"
    )
    client = FailingFirst(boto3.client("dynamodb", region_name=REGION), denied, count=100)
    with pytest.raises(AwsUnavailableError, match="refused"):
        coordinator(client).start()
    assert client.failed == ["describe_table"]
