"""The composition root's start-up warnings (the rest is driven through the e2e tests)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from sqsbalancerd.app import Application
from sqsbalancerd.discovery import DiscoveryResult, QueueInfo


def result_of(count: int, *, with_redrive: int = 0) -> DiscoveryResult:
    target = "arn:aws:sqs:us-east-1:000000000000:dlq"
    infos = tuple(
        QueueInfo(f"q{n:05d}", f"http://sqs/q{n:05d}", dead_letter_target_arn=target)
        if n < with_redrive
        else QueueInfo(f"q{n:05d}", f"http://sqs/q{n:05d}")
        for n in range(count)
    )
    return DiscoveryResult(infos, ())


def redrive_warnings(caplog: pytest.LogCaptureFixture) -> list[Any]:
    return [r for r in caplog.records if "no redrive policy" in r.getMessage()]


def test_a_few_queues_without_redrive_policy_are_named_one_by_one(caplog):
    caplog.set_level(logging.WARNING, logger="sqsbalancerd")
    Application._warn_about(None, result_of(12, with_redrive=3))  # type: ignore[arg-type]
    assert [r.queue for r in redrive_warnings(caplog)] == [f"q{n:05d}" for n in range(3, 12)]


def test_thousands_of_queues_without_redrive_policy_make_one_line(caplog):
    caplog.set_level(logging.WARNING, logger="sqsbalancerd")
    Application._warn_about(None, result_of(10_000, with_redrive=50))  # type: ignore[arg-type]
    [record] = redrive_warnings(caplog)
    assert record.count == 9_950
    assert record.queues == [f"q{n:05d}" for n in range(50, 60)]


def test_the_long_poll_pool_keeps_a_connection_for_each_of_ten_thousand_owned_queues():
    """One long poll in flight per owned queue: at 10,000 queues on one instance the cap was
    1,024 + workers, and every poll past it reconnected ("Connection pool is full")."""
    from sqsbalancerd.app import aws_options, long_poll_pool_size
    from sqsbalancerd.aws import sqs_client
    from sqsbalancerd.config import load_settings

    settings = load_settings(
        overrides={"discovery": {"queue_pattern": "^q"}, "aws": {"region": "us-east-1"}}
    )
    pool = long_poll_pool_size(settings)
    assert pool >= settings.workers.pool_size + 10_000
    client = sqs_client(aws_options(settings, pool_connections=pool))
    session = client._endpoint.http_session  # type: ignore[attr-defined]
    assert session._max_pool_connections == pool  # what each urllib3 pool is given


def test_more_queues_than_the_pool_keeps_are_said_once(caplog, monkeypatch):
    monkeypatch.setattr("sqsbalancerd.app.MAX_POLL_CONNECTIONS", 100)
    caplog.set_level(logging.WARNING, logger="sqsbalancerd")
    Application._warn_about(None, result_of(150, with_redrive=150))  # type: ignore[arg-type]
    [record] = [r for r in caplog.records if "connection pool" in r.getMessage()]
    assert (record.count, record.connections) == (150, 100)
