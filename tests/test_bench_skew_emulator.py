"""The skew bench's emulator fix: concurrent deletes of one queue's messages all land.

Without it (checked): 8 threads deleting 800 messages of one queue on the bench's patched
moto left 250-390 of them in the queue, to run again once their visibility ran out.
"""

from __future__ import annotations

from moto.sqs.models import SQSBackend

from bench import moto_patch, skew_emulator


def test_concurrent_deletes_of_one_queue_leave_no_message_behind():
    original = SQSBackend.delete_message
    was_patched = moto_patch.is_applied()
    try:
        moto_patch.apply()  # as the bench's emulator runs
        skew_emulator.atomic_deletes()
        skew_emulator.atomic_deletes()  # once only: a second call does not wrap it again
        assert getattr(SQSBackend.delete_message, "is_atomic", False)
        for _ in range(3):
            skew_emulator.verify_atomic_deletes(threads=8, per_thread=100)
    finally:
        SQSBackend.delete_message = original
        if not was_patched:
            moto_patch.revert()
