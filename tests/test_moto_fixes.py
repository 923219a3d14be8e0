"""The embedded emulator's fixes to moto: receives of one queue take each message once, and
concurrent deletes all land."""

from __future__ import annotations

import threading
import time

from moto.sqs.models import SQSBackend
from support import wait_until

from sqsbalancerd import moto_fixes
from sqsbalancerd.moto_fixes import atomic_receives, concurrent_receive_duplicates


def test_concurrent_receives_of_one_queue_never_take_the_same_message() -> None:
    atomic_receives()
    # Stock moto checks visibility and marks a message received in two steps: at this
    # switch interval 2 to 3 of 400 went to two receivers at once (and a run took ~70 s).
    assert concurrent_receive_duplicates(threads=4, messages=200) == 0


def test_a_long_poll_waiting_on_a_queue_does_not_block_another_receive_of_it() -> None:
    atomic_receives()
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


def test_concurrent_deletes_of_one_queue_leave_no_message_behind() -> None:
    moto_fixes.apply()
    moto_fixes.apply()  # once only: a second call does not wrap it again
    # Stock moto rebinds the queue's list per delete, unlocked: 8 threads deleting 800
    # messages left 250 to 390 behind, to run again once their visibility ran out.
    assert moto_fixes.concurrent_delete_leftovers(threads=4, per_thread=50) == 0
