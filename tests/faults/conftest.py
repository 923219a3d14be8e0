"""Fixtures shared by the fault suite (tests/faults/).

Every test here carries the `faults` marker. Two modes:
- short (default; CI): small totals, each test well under the 120 s pytest-timeout;
- long (`SQSB_FAULTS_LONG=1 python -m pytest tests/faults -m faults`): the figures of
  issue 7 (e.g. 20,000 → 100,000 messages for the rolling restart), longer outages, and
  every test's timeout multiplied by `FaultTotals.timeout_scale`.
Totals are read from `totals` (a `FaultTotals`, tests/faults/totals.py; modules that need
them at import time, for hypothesis settings, import `TOTALS`), never hard-coded in tests.

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

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from proxy import FaultProxy
from totals import TOTALS, FaultTotals


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
    balance: str = "load",
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
        f'balance = "{balance}"',
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
