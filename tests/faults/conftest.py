"""Fixtures shared by the fault suite (tests/faults/).

Every test here carries the `faults` marker. Two modes:
- short (default; CI): small totals, each test well under the 120 s pytest-timeout;
- long (`SQSB_FAULTS_LONG=1 python -m pytest tests/faults -m faults`): the figures of
  issue 7 (e.g. 20,000 → 100,000 messages for the rolling restart), longer outages, and
  every test's timeout multiplied by `FaultTotals.timeout_scale`.
Totals are read from `totals` (a `FaultTotals`), never hard-coded in the tests.

Faults are either real (moto really does it: a deleted table, a closed port, messages that
come back after their visibility timeout, a killed process) or simulated by the proxy in
proxy.py (throttling, 5xx, dropped or blackholed connections, failed batch entries,
rejected receipt handles); each test says which.

Fixtures: `totals`; `proxies` (a factory: `proxies.start("n1")` → a `FaultProxy` in front
of this test's moto server, stopped after the test; `proxy.env()` points a daemon at it);
`fault_config` (a function building a daemon's TOML with fast timings, see
`daemon_config`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from proxy import FaultProxy

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
    rolling_messages=20_000,
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long mode: stretch each fault test's timeout (the closest timeout marker wins)."""
    if TOTALS.timeout_scale == 1.0:
        return
    for item in items:
        if item.get_closest_marker("faults") is None:
            continue
        marker = item.get_closest_marker("timeout")
        base_s = float(marker.args[0]) if marker and marker.args else 120.0
        item.add_marker(pytest.mark.timeout(base_s * TOTALS.timeout_scale), append=False)


@pytest.fixture
def totals() -> FaultTotals:
    return TOTALS


@dataclass
class ProxyFactory:
    upstream: str
    started: list[FaultProxy] = field(default_factory=list)

    def start(self, name: str = "proxy") -> FaultProxy:
        proxy = FaultProxy(self.upstream, name=name).start()
        self.started.append(proxy)
        return proxy


@pytest.fixture
def proxies(endpoint: str) -> Iterator[ProxyFactory]:
    factory = ProxyFactory(endpoint)
    yield factory
    for proxy in factory.started:
        proxy.stop()


TABLE = "sqsb-faults"
QUEUE_PATTERN = "^faults-"


def daemon_config(
    *,
    instance_id: str | None = None,
    mode: str = "dynamodb",
    handler: str = "handlers:record",
    table: str = TABLE,
    queue_pattern: str = QUEUE_PATTERN,
    heartbeat_interval_s: float = 1.0,
    heartbeat_timeout_s: float = 4.0,
    rebalance_delay_s: float = 1.0,
    fence_margin_s: float | None = None,
    wait_time_s: int = 1,
    pool_size: int = 4,
    queue_size: int = 8,
    shutdown_timeout_s: float = 10.0,
    http_port: int = 0,
    extra: str = "",
) -> str:
    """A daemon's TOML with the suite's fast timings (heartbeat 1 s, timeout 4 s, delay 1 s,
    1 s long polls) and a small prefetch, so a fenced or stopping instance holds little."""
    lines = [f'handler = "{handler}"']
    if instance_id is not None:
        lines.append(f'instance_id = "{instance_id}"')
    lines += [
        "[coordination]",
        f'mode = "{mode}"',
        f'table_name = "{table}"',
        f"heartbeat_interval = {heartbeat_interval_s}",
        f"heartbeat_timeout = {heartbeat_timeout_s}",
        f"rebalance_delay = {rebalance_delay_s}",
    ]
    if fence_margin_s is not None:
        lines.append(f"fence_margin = {fence_margin_s}")
    lines += [
        "[discovery]",
        f'queue_pattern = "{queue_pattern}"',
        "interval = 1",
        "[sqs]",
        f"wait_time_seconds = {wait_time_s}",
        "[workers]",
        f"pool_size = {pool_size}",
        f"queue_size = {queue_size}",
        "[shutdown]",
        f"timeout = {shutdown_timeout_s}",
        "[retry]",
        "base = 0",
        "[observability]",
        f"http_port = {http_port}",
        'log_format = "json"',
    ]
    return "\n".join(lines) + "\n" + extra


@pytest.fixture
def fault_config() -> Callable[..., str]:
    return daemon_config
