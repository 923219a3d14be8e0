"""The published Python library `aws-sqs-consumer` (PyPI), used as its README shows.

One `Consumer` per queue, each blocking in `start()` on its own thread (the library has no
pool): batches of ten, long polls, `handle_message_batch` handles the batch in order and
the library deletes it with DeleteMessageBatch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from bench.consumers.common import parse_args, sqs_client, stop_event, wait_threads
from bench.handlers import record


def make_consumer(url: str, sqs: Any, wait_s: int) -> Any:
    from aws_sqs_consumer import Consumer

    class BenchConsumer(Consumer):  # type: ignore[misc]
        def handle_message_batch(self, messages: list[Any]) -> None:
            for message in messages:
                record(message.MessageId)

    return BenchConsumer(
        queue_url=url, sqs_client=sqs, batch_size=10, wait_time_seconds=wait_s, region="us-east-1"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args("aws-sqs-consumer", argv)
    sqs = sqs_client(args.endpoint, pool=len(args.queue_urls) + 2)
    stop = stop_event()
    consumers = [make_consumer(url, sqs, args.wait_s) for url in args.queue_urls]
    threads = [threading.Thread(target=c.start, daemon=True) for c in consumers]
    for thread in threads:
        thread.start()
    wait_threads(threads, stop)
    for consumer in consumers:
        consumer.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
