"""`/metrics`, `/healthz` and `/readyz` on the standard library's threading HTTP server.

The server starts no thread of its own: the runtime calls `serve(stop)` in a thread it
owns and sets `stop` to end it. Each request is handled on a short-lived daemon thread
(ThreadingHTTPServer), so a slow scrape never holds up shutdown.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import cast
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry

from sqsbalancerd.observability.health import HealthReport
from sqsbalancerd.observability.metrics import CONTENT_TYPE, render

logger = logging.getLogger(__name__)

# How long `serve` waits for a request before looking at `stop` again: bounds shutdown time.
POLL_INTERVAL_S = 0.1
# A client that stops sending mid-request gives up its thread after this long.
REQUEST_TIMEOUT_S = 10.0

HealthCheck = Callable[[], HealthReport]
Response = tuple[HTTPStatus, str, bytes]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        registry: CollectorRegistry,
        liveness: HealthCheck,
        readiness: HealthCheck,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.registry = registry
        self.liveness = liveness
        self.readiness = readiness
        super().__init__(address, _Handler)


def _health_response(report: HealthReport) -> Response:
    status = HTTPStatus.OK if report.ok else HTTPStatus.SERVICE_UNAVAILABLE
    return status, "application/json", (report.to_json() + "\n").encode()


def _route(server: _Server, path: str) -> Response:
    if path == "/metrics":
        return HTTPStatus.OK, CONTENT_TYPE, render(server.registry)
    if path == "/healthz":
        return _health_response(server.liveness())
    if path == "/readyz":
        return _health_response(server.readiness())
    return HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n"


class _Handler(BaseHTTPRequestHandler):
    timeout = REQUEST_TIMEOUT_S

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        try:
            status, content_type, body = _route(cast(_Server, self.server), path)
        except Exception:  # request boundary: answer 500, keep serving
            logger.exception("HTTP handler failed", extra={"path": path})
            status, content_type = HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8"
            body = b"internal error\n"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # Scrapes and probes arrive every few seconds: keep them out of INFO.
        logger.debug("HTTP " + format, *args)


class HttpServer:
    """Binds on construction (so `.port` is known at once); `serve` runs until `stop` is set."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        registry: CollectorRegistry,
        liveness: HealthCheck,
        readiness: HealthCheck,
    ) -> None:
        self._server = _Server(
            (host, port), registry=registry, liveness=liveness, readiness=readiness
        )
        self._server.timeout = POLL_INTERVAL_S
        self.host = host
        self.port: int = self._server.server_address[1]
        self._closed = threading.Event()

    def serve(self, stop: threading.Event) -> None:
        """Handle requests on the calling thread until `stop` is set, then close the socket."""
        logger.info("HTTP server listening", extra={"host": self.host, "port": self.port})
        try:
            # handle_request returns after one request or POLL_INTERVAL_S, so `stop` is
            # noticed promptly without a second thread to call shutdown().
            while not stop.is_set() and not self._closed.is_set():
                self._server.handle_request()
        finally:
            self.close()
        logger.info("HTTP server stopped", extra={"port": self.port})

    def close(self) -> None:
        """Close the listening socket; idempotent."""
        if not self._closed.is_set():
            self._closed.set()
            self._server.server_close()
