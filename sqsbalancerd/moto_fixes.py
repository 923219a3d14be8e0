"""Fixes to moto's SQS that make the embedded emulator behave as SQS does where it matters.

Two races, both between concurrent requests on one queue, both never seen on SQS:

moto's ReceiveMessage checks that a message is visible and marks it received in two steps,
without a lock, so two receives of one queue on two server threads can both take the same
message (both answers carry it, each with its own first-receive time; a FIFO group can be
handed to two receivers at once). SQS never hands a message to two receivers at once, and a
queue shared by several owners (load-aware balancing's replicas) or several daemons is
exactly two concurrent receives: the load-balancing bench counted 6 of 24,000 messages
"handled twice at once" that were moto's. `atomic_receives` makes the receives of one queue
exclusive, released while a long poll waits, so long polls still wait side by side.

moto deletes a message by rebinding its queue's list without it, outside any lock, so two
DeleteMessage(Batch) calls on one queue at once (an ack thread and a second owner, two
pools deleting a hot queue's batches) can each copy the list and rebind it: one delete is
lost and the message comes back when its visibility runs out (in process, 8 threads
deleting 800 messages left 250 to 390 behind). `atomic_deletes` runs each delete under the
queue's message lock, the one sends append under.

Applied by `sqsbalancerd.local.LocalEmulator` (`local`, `demo` and the tests) and by the
bench's emulator; moto is imported only when they call it.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

_ORIGINAL: dict[str, Any] = {}


_claim = threading.local()  # the queue lock this thread's receive holds, if any
_queue_locks: dict[tuple[int, str], threading.Lock] = {}
_queue_locks_guard = threading.Lock()


def _queue_lock(backend: Any, queue_name: str) -> threading.Lock:
    key = (id(backend), queue_name)
    with _queue_locks_guard:
        return _queue_locks.setdefault(key, threading.Lock())


def _exclusive_receive(original: Callable[..., Any]) -> Callable[..., Any]:
    def receive_message(self: Any, queue_name: str, *args: Any, **kwargs: Any) -> Any:
        lock = _queue_lock(self, queue_name)
        with lock:
            _claim.lock = lock
            try:
                return original(self, queue_name, *args, **kwargs)
            finally:
                _claim.lock = None

    receive_message.__wrapped__ = original  # type: ignore[attr-defined]
    return receive_message


def releasing_claim(wait: Callable[..., None]) -> Callable[..., None]:
    """A receive's wait for messages, with its queue's lock let go meanwhile."""

    def wait_for_messages(self: Any, timeout: float) -> None:
        lock = getattr(_claim, "lock", None)
        if lock is None:
            wait(self, timeout)
            return
        lock.release()
        try:
            wait(self, timeout)
        finally:
            lock.acquire()

    wait_for_messages.__wrapped__ = wait  # type: ignore[attr-defined]
    return wait_for_messages


def atomic_receives() -> None:
    """One receive at a time takes messages from a queue (idempotent)."""
    from moto.sqs.models import Queue, SQSBackend

    if "receive" in _ORIGINAL:
        return
    _ORIGINAL["receive"] = SQSBackend.receive_message
    _ORIGINAL["wait"] = Queue.wait_for_messages
    setattr(SQSBackend, "receive_message", _exclusive_receive(SQSBackend.receive_message))  # noqa: B010
    setattr(Queue, "wait_for_messages", releasing_claim(Queue.wait_for_messages))  # noqa: B010


def atomic_deletes() -> None:
    """DeleteMessage(Batch) of a queue under its message lock (idempotent)."""
    from moto.sqs.models import SQSBackend

    if "delete" in _ORIGINAL:
        return
    original = _ORIGINAL["delete"] = SQSBackend.delete_message

    def delete_message(self: Any, queue_name: str, receipt_handle: str) -> None:
        with self.get_queue(queue_name)._messages_lock:
            original(self, queue_name, receipt_handle)

    delete_message.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(SQSBackend, "delete_message", delete_message)  # noqa: B010


def apply() -> None:
    """Both fixes (the embedded emulator and the bench's call this)."""
    atomic_receives()
    atomic_deletes()


def concurrent_delete_leftovers(threads: int = 8, per_thread: int = 100) -> int:
    """Messages still queued after concurrent deletes of every one of them."""
    from moto.sqs.models import SQSBackend

    backend = SQSBackend("us-east-1", "123456789012")
    backend.create_queue("v-deletes")
    for _ in range(threads * per_thread):
        backend.send_message("v-deletes", "x")
    handles = [m.receipt_handle for m in backend.receive_message("v-deletes", 10**6, 0, 300)]

    def delete(chunk: list[str]) -> None:
        for handle in chunk:
            backend.delete_message("v-deletes", handle)

    workers = [threading.Thread(target=delete, args=(handles[i::threads],)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    return len(backend.get_queue("v-deletes")._messages)


def concurrent_receive_duplicates(threads: int = 8, messages: int = 400) -> int:
    """Messages two concurrent receivers both got, on a fresh in-process backend: the
    GIL switched every microsecond so that a race in a receive shows within one run.
    (Stock moto 5.2.5, measured here: 2 to 3 of 400 in each of three runs, ~70 s a run.)"""
    from moto.sqs.models import SQSBackend

    backend = SQSBackend("us-east-1", "123456789012")
    backend.create_queue("v-race")
    for n in range(messages):
        backend.send_message("v-race", f"b{n}")
    got: list[str] = []
    start = threading.Barrier(threads)

    def drain() -> None:
        start.wait()
        while batch := backend.receive_message("v-race", 10, 0, 300):
            got.extend(m.id for m in batch)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        workers = [threading.Thread(target=drain) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    return len(got) - len(set(got))
