from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _quiet_coordination_logs() -> Iterator[None]:
    """The coordinator logs every fault it survives: thousands per run. Restored after, so
    tests elsewhere that read the logs (caplog) still see them."""
    logger = logging.getLogger("sqsbalancerd")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)
