"""The bench emulator's moto patch: the same answers as stock moto, and atomic receives."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import wait_until

from bench import moto_patch


@pytest.fixture
def patched() -> Iterator[None]:
    moto_patch.apply()
    try:
        yield
    finally:
        moto_patch.revert()


def test_patched_moto_answers_as_stock_moto_does() -> None:
    moto_patch.verify()
    assert not moto_patch.is_applied()


@pytest.mark.usefixtures("patched")
def test_concurrent_receives_of_one_queue_never_take_the_same_message() -> None:
    # Stock moto checks visibility and marks a message received in two steps: under
    # this switch interval 2-3 of 400 went to two receivers at once (and it takes ~70 s).
    assert moto_patch.concurrent_receive_duplicates(threads=8, messages=400) == 0


@pytest.mark.usefixtures("patched")
def test_a_long_poll_waiting_on_a_queue_does_not_block_another_receive_of_it() -> None:
    import threading
    import time

    from moto.sqs.models import SQSBackend

    backend = SQSBackend("us-east-1", "123456789012")
    backend.create_queue("v-wait")
    waiting = threading.Thread(target=backend.receive_message, args=("v-wait", 10, 3, 30))
    waiting.start()
    condition = backend.get_queue("v-wait")._messages_lock
    # CPython's Condition keeps its waiters in `_waiters`: the long poll is in its wait.
    assert wait_until(lambda: len(condition._waiters) == 1, timeout_s=5)
    started = time.monotonic()
    assert backend.receive_message("v-wait", 10, 0, 30) == []
    assert time.monotonic() - started < 1.0
    waiting.join(timeout=10)
