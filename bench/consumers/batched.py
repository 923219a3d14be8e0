"""A well-written batched consumer: a receiver thread per queue, a shared handler pool.

Each receiver first takes ten slots of a semaphore (max(2 x workers, 10 x queues) slots, so
every queue can hold one full batch and prefetching stays bounded), long-polls for ten
messages, gives back the slots it did not use, runs the messages on a ThreadPoolExecutor
and deletes the successful ones with one DeleteMessageBatch per received batch, from the
worker that finishes the batch's last message.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.consumers.common import parse_args, sqs_client, stop_event, wait_threads
from bench.handlers import record


class Batch:
    def __init__(self, sqs: Any, url: str, messages: list[dict[str, Any]], slots: Any) -> None:
        self._sqs, self._url, self._slots = sqs, url, slots
        self._messages = messages
        self._left = len(messages)
        self._done: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def run_one(self, message: dict[str, Any]) -> None:
        try:
            record(message["MessageId"])
            ok = True
        except Exception:
            ok = False
        with self._lock:
            if ok:
                self._done.append(message)
            self._left -= 1
            is_last = self._left == 0
        self._slots.release()
        if is_last and self._done:
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                for i, m in enumerate(self._done)
            ]
            self._sqs.delete_message_batch(QueueUrl=self._url, Entries=entries)


def receive_loop(
    sqs: Any, url: str, pool: ThreadPoolExecutor, slots: Any, wait_s: int, stop: threading.Event
) -> None:
    while not stop.is_set():
        granted = 0
        while granted < 10 and not stop.is_set():
            if slots.acquire(timeout=0.5):
                granted += 1
        if stop.is_set():
            return
        response = sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=granted, WaitTimeSeconds=wait_s
        )
        messages = response.get("Messages", [])
        for _ in range(granted - len(messages)):
            slots.release()
        if messages:
            batch = Batch(sqs, url, messages, slots)
            for message in messages:
                pool.submit(batch.run_one, message)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args("batched", argv)
    sqs = sqs_client(args.endpoint, pool=args.workers + len(args.queue_urls) + 4)
    stop = stop_event()
    slots = threading.Semaphore(max(args.workers * 2, 10 * len(args.queue_urls)))
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        threads = [
            threading.Thread(
                target=receive_loop,
                args=(sqs, url, pool, slots, args.wait_s, stop),
                daemon=True,
            )
            for url in args.queue_urls
        ]
        for thread in threads:
            thread.start()
        wait_threads(threads, stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
