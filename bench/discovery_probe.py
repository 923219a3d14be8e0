"""Time sqsbalancerd's discovery in a process of its own: a cold refresh, then a warm one.

    python -m bench.discovery_probe --pattern '^disc-q'

Prints JSON: seconds and SQS calls (counted by a botocore hook) of each refresh.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.discovery_probe")
    parser.add_argument("--pattern", required=True)
    args = parser.parse_args(argv)
    from sqsbalancerd.aws import AwsOptions, sqs_client
    from sqsbalancerd.config import DiscoverySettings
    from sqsbalancerd.discovery import Discovery

    sqs = sqs_client(AwsOptions(region="us-east-1"))
    calls: Counter[str] = Counter()

    def count(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    sqs.meta.events.register("before-call", count)
    discovery = Discovery(sqs, DiscoverySettings(queue_pattern=args.pattern))
    rounds = {}
    for name in ("cold", "warm"):
        calls.clear()
        started = time.monotonic()
        result = discovery.discover()
        rounds[name] = {
            "seconds": round(time.monotonic() - started, 2),
            "matched": len(result.matched),
            "calls": dict(calls),
        }
    print(json.dumps(rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
