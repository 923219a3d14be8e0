"""The fault suite's totals: short (default; CI) or long (SQSB_FAULTS_LONG=1).

A module of its own (not conftest.py) so test modules can read them at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

IS_LONG = os.environ.get("SQSB_FAULTS_LONG") == "1"


@dataclass(frozen=True)
class FaultTotals:
    is_long: bool
    timeout_scale: float  # applied to every fault test's timeout marker
    # Feeders keep each queue this shallow (moto's receive slows with depth).
    queue_depth: int
    # test_aws_faults.py: SQS throttling / 5xx bursts, partial and rejected deletes.
    sqs_queues: int
    sqs_messages: int
    # test_fencing.py: two instances, one loses DynamoDB; the table deleted.
    cluster_queues: int
    cluster_messages: int
    outage_handled: int  # messages the survivor handles from taken queues before recovery
    # test_process_faults.py and friends (issue 7's figures).
    rolling_instances: int
    rolling_queues: int
    rolling_messages: int
    kill_rounds: int
    kill_every_s: float
    many_queues: int  # queues owned by one process
    discovered_queues: int  # queues discovery pages through
    fuzz_examples: int
    extra: dict[str, float] = field(default_factory=dict)


SHORT = FaultTotals(
    is_long=False,
    timeout_scale=1.0,
    queue_depth=200,
    sqs_queues=4,
    sqs_messages=400,
    cluster_queues=6,
    cluster_messages=240,
    outage_handled=5,
    rolling_instances=4,
    rolling_queues=50,
    rolling_messages=4_000,
    kill_rounds=3,
    kill_every_s=4.0,
    many_queues=500,
    discovered_queues=1_500,
    fuzz_examples=60,
)
LONG = FaultTotals(
    is_long=True,
    timeout_scale=8.0,
    queue_depth=200,
    sqs_queues=8,
    sqs_messages=4_000,
    cluster_queues=12,
    cluster_messages=2_400,
    outage_handled=200,
    rolling_instances=4,
    rolling_queues=50,
    rolling_messages=100_000,
    kill_rounds=12,
    kill_every_s=4.0,
    many_queues=500,
    discovered_queues=1_500,
    fuzz_examples=600,
)
TOTALS = LONG if IS_LONG else SHORT
