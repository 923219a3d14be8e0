"""The test helpers themselves: a helper that hides a failure makes every test using it vacuous."""

from __future__ import annotations

import pytest
from support import Feeder, wait_until


def test_a_feeder_that_fails_says_so_instead_of_reporting_a_short_count(endpoint: str) -> None:
    missing = f"{endpoint}/123456789012/no-such-queue"
    feeder = Feeder(endpoint, {"no-such-queue": missing}, total=10).start()
    try:
        wait_until(feeder.is_finished, timeout_s=30, what="the feeder to give up")
        assert not feeder.done.is_set()
        with pytest.raises(AssertionError, match="the feeder failed"):
            feeder.sent_ids()
    finally:
        feeder.stop()
