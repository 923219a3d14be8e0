"""The emulator ceiling: receive ten, record, DeleteMessageBatch; no handler, no pool.

Two threads per queue keep the emulator busy; what this drains per second is what the
emulator allows, the yardstick for every other consumer.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from bench.consumers.common import parse_args, sqs_client, stop_event, wait_threads
from bench.handlers import record

THREADS_PER_QUEUE = 2


def drain(sqs: Any, url: str, wait_s: int, stop: threading.Event) -> None:
    while not stop.is_set():
        response = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_s)
        messages = response.get("Messages", [])
        if not messages:
            continue
        for message in messages:
            record(message["MessageId"])
        entries = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
        ]
        sqs.delete_message_batch(QueueUrl=url, Entries=entries)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args("ceiling", argv)
    count = THREADS_PER_QUEUE * len(args.queue_urls)
    sqs = sqs_client(args.endpoint, pool=count + 2)
    stop = stop_event()
    threads = [
        threading.Thread(target=drain, args=(sqs, url, args.wait_s, stop), daemon=True)
        for url in args.queue_urls
        for _ in range(THREADS_PER_QUEUE)
    ]
    for thread in threads:
        thread.start()
    wait_threads(threads, stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
