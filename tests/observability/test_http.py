from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.error import HTTPError
from urllib.request import ProxyHandler, build_opener

import pytest
from prometheus_client import CollectorRegistry

from sqsbalancerd.observability.health import HealthReport
from sqsbalancerd.observability.http import HttpServer
from sqsbalancerd.observability.metrics import build_registry
from sqsbalancerd.stats import QueueStats, StatsSnapshot

HEALTHY = HealthReport(ok=True, checks={"loops": "ok"})
UNREADY = HealthReport(ok=False, checks={"coordination": "fenced"})

# No proxy from the environment may stand between the test and 127.0.0.1.
_opener = build_opener(ProxyHandler({}))


def snapshot() -> StatsSnapshot:
    return StatsSnapshot(
        instance_id="i-1",
        owned_queues=("orders",),
        queues=(QueueStats("orders", received=5),),
        workers_busy=0,
        pool_size=2,
        stuck_slots=0,
        work_queue_depth=0,
        aws_calls={},
        handler_duration={},
        message_age={},
        loop_ticks_age_s={},
    )


def get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with _opener.open(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read()


class Running:
    def __init__(self, server: HttpServer, stop: threading.Event, thread: threading.Thread):
        self.server = server
        self.stop = stop
        self.thread = thread

    @property
    def port(self) -> int:
        return self.server.port


StartServer = Callable[..., Running]


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """Factory: serve in a thread of the test's own; every one is stopped and joined."""
    started: list[Running] = []

    def start(
        *,
        registry: CollectorRegistry | None = None,
        liveness: Callable[[], HealthReport] = lambda: HEALTHY,
        readiness: Callable[[], HealthReport] = lambda: HEALTHY,
    ) -> Running:
        server = HttpServer(
            host="127.0.0.1",
            port=0,
            registry=registry or build_registry(snapshot, None),
            liveness=liveness,
            readiness=readiness,
        )
        stop = threading.Event()
        thread = threading.Thread(target=server.serve, args=(stop,), name="test-http")
        thread.start()
        started.append(Running(server, stop, thread))
        return started[-1]

    yield start
    for running in started:
        running.stop.set()
        running.thread.join(timeout=5)
        assert not running.thread.is_alive()


def test_binds_an_ephemeral_port_when_given_zero(start_server: StartServer) -> None:
    running = start_server()

    assert running.port > 0


def test_metrics_in_prometheus_text_format(start_server: StartServer) -> None:
    running = start_server()

    status, content_type, body = get(running.port, "/metrics")

    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b'sqsbalancerd_messages_total{outcome="received",queue="orders"} 5.0' in body


def test_health_endpoints_answer_json_with_status(start_server: StartServer) -> None:
    running = start_server(liveness=lambda: HEALTHY, readiness=lambda: UNREADY)

    live_status, live_type, live_body = get(running.port, "/healthz")
    ready_status, ready_type, ready_body = get(running.port, "/readyz")

    assert (live_status, live_type) == (200, "application/json")
    assert json.loads(live_body) == {"ok": True, "checks": {"loops": "ok"}}
    assert (ready_status, ready_type) == (503, "application/json")
    assert json.loads(ready_body) == {"ok": False, "checks": {"coordination": "fenced"}}


def test_health_is_judged_per_request(start_server: StartServer) -> None:
    reports = [UNREADY]
    running = start_server(liveness=lambda: reports[-1])

    assert get(running.port, "/healthz")[0] == 503
    reports.append(HEALTHY)
    assert get(running.port, "/healthz")[0] == 200


def test_query_string_is_ignored_and_other_paths_are_404(start_server: StartServer) -> None:
    running = start_server()

    assert get(running.port, "/metrics?name[]=x")[0] == 200
    assert get(running.port, "/")[0] == 404
    assert get(running.port, "/metrics/extra")[0] == 404


def test_failing_check_answers_500_and_keeps_serving(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> HealthReport:
        raise RuntimeError("snapshot failed")

    running = start_server(readiness=broken)

    assert get(running.port, "/readyz")[0] == 500
    assert get(running.port, "/healthz")[0] == 200
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError


def test_request_logs_are_debug_only(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sqsbalancerd.observability.http")
    running = start_server()

    get(running.port, "/metrics")

    requests = [r for r in caplog.records if "GET /metrics" in r.getMessage()]
    assert requests
    assert {r.levelno for r in requests} == {logging.DEBUG}


def test_stop_is_prompt_and_closes_the_socket(start_server: StartServer) -> None:
    running = start_server()
    assert get(running.port, "/healthz")[0] == 200

    started_at = time.monotonic()
    running.stop.set()
    running.thread.join(timeout=1)

    assert not running.thread.is_alive()
    assert time.monotonic() - started_at < 1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", running.port), timeout=1).close()


def test_close_before_serve_makes_serve_return() -> None:
    server = HttpServer(
        host="127.0.0.1",
        port=0,
        registry=build_registry(snapshot, None),
        liveness=lambda: HEALTHY,
        readiness=lambda: HEALTHY,
    )
    server.close()
    server.close()  # idempotent

    server.serve(threading.Event())  # returns at once instead of blocking

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
