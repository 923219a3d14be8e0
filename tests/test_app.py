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
