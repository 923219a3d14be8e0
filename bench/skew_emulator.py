"""The skew bench's emulator: `bench.emulator` with moto's deletes made atomic.

    python -m bench.skew_emulator [bench.emulator's flags]

moto deletes a message by rebinding its queue's list without the message (stock and the
bench's patch alike), outside the lock its sends and long polls use. Two DeleteMessageBatch
calls on one queue at once (several ack senders, or a pool's workers, deleting a hot
queue's batches) can each copy the list and rebind it, and one delete is lost: the message
comes back when its visibility runs out and runs again. In one run a hot queue alone handled
3,000 messages in 12 s, then 30 resurrected ones 30 s later, which read as 70 msgs/s instead
of ~250. SQS never returns a deleted message; every contender meets the same fix.
"""

from __future__ import annotations

import sys
import threading
from typing import Any


def atomic_deletes() -> None:
    """DeleteMessage(Batch) under the queue's message lock (the one sends append under)."""
    from moto.sqs.models import SQSBackend

    if getattr(SQSBackend.delete_message, "is_atomic", False):
        return
    original = SQSBackend.delete_message

    def delete_message(self: Any, queue_name: str, receipt_handle: str) -> None:
        queue = self.get_queue(queue_name)
        with queue._messages_lock:
            original(self, queue_name, receipt_handle)

    delete_message.is_atomic = True  # type: ignore[attr-defined]
    SQSBackend.delete_message = delete_message


def verify_atomic_deletes(threads: int = 8, per_thread: int = 100) -> None:
    """Concurrent deletes of one queue's messages leave none behind."""
    from moto.sqs.models import SQSBackend

    backend = SQSBackend("us-east-1", "123456789012")
    backend.create_queue("v-atomic")
    for _ in range(threads * per_thread):
        backend.send_message("v-atomic", "x")
    handles = [m.receipt_handle for m in backend.receive_message("v-atomic", 10**6, 0, 300)]
    chunks = [handles[i::threads] for i in range(threads)]
    workers = [
        threading.Thread(target=lambda c=c: [backend.delete_message("v-atomic", h) for h in c])
        for c in chunks
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    left = len(backend.get_queue("v-atomic")._messages)
    assert left == 0, f"{left} deleted messages still in the queue"


def main(argv: list[str] | None = None) -> int:
    from bench import emulator, moto_patch

    moto_patch.apply()  # as the emulator does (the skew bench always runs it patched)
    atomic_deletes()
    verify_atomic_deletes()
    return emulator.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
