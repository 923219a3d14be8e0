"""Engine unit tests run against moto in-process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws


@pytest.fixture
def moto_sqs() -> Iterator[Any]:
    """An SQS client on moto's in-process mock (fresh state per test)."""
    with mock_aws():
        yield boto3.client("sqs", region_name="us-east-1")
