"""The naive loop: one thread, receive one message, handle it, delete it; queue by queue."""

from __future__ import annotations

from collections.abc import Sequence

from bench.consumers.common import parse_args, sqs_client, stop_event
from bench.handlers import record


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args("naive", argv)
    sqs = sqs_client(args.endpoint, pool=2)
    stop = stop_event()
    while not stop.is_set():
        for url in args.queue_urls:
            response = sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=args.wait_s
            )
            for message in response.get("Messages", []):
                record(message["MessageId"])
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            if stop.is_set():
                break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
