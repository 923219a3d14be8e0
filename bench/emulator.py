"""The bench's emulator: moto's server in its own process, counting requests server-side.

    python -m bench.emulator [--port 0] [--no-moto-patch]

prints one JSON line ({"port": ..., "patched": ...}) when it listens on 127.0.0.1, then
serves until SIGTERM. A thin WSGI middleware in front of moto counts every request by
(client, service, action): the action from the X-Amz-Target header (JSON protocol, e.g.
"AmazonSQS.ReceiveMessage", "DynamoDB_20120810.Query") or the Action= field (query
protocol); the service from the SigV4 credential scope; the client is "harness" for the
bench's own feeding and checking (access key "harness") and "consumer" for everything else.
It also counts the messages ReceiveMessage returned and the TCP connections seen.

    GET  /__bench/counts   the counters as JSON
    POST /__bench/reset    the counters as JSON, then zeroed
"""

from __future__ import annotations

import argparse
import io
import json
import re
import signal
import sys
import threading
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

HARNESS_KEY = "harness"
_CREDENTIAL = re.compile(r"Credential=([^/]+)/[^/]+/[^/]+/([^/]+)/")


class CountingMiddleware:
    def __init__(self, app: Any) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._received: Counter[str] = Counter()
        self._connections: set[tuple[str, str]] = set()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/__bench/"):
            return self._control(path, environ, start_response)
        client, service, action = self._classify(environ)
        key = f"{client}|{service}|{action}"
        with self._lock:
            self._counts[key] += 1
            self._connections.add((environ.get("REMOTE_ADDR", ""), environ.get("REMOTE_PORT", "")))
        body = self._app(environ, start_response)
        if action != "ReceiveMessage":
            return body
        data = b"".join(body)
        if hasattr(body, "close"):
            body.close()
        returned = data.count(b'"MessageId"') or data.count(b"<MessageId>")
        if returned:
            with self._lock:
                self._received[client] += returned
        return [data]

    @staticmethod
    def _classify(environ: dict[str, Any]) -> tuple[str, str, str]:
        match = _CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
        key_id, service = (match.group(1), match.group(2)) if match else ("", "unknown")
        client = "harness" if key_id == HARNESS_KEY else "consumer"
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if target:
            return client, service, target.rsplit(".", 1)[-1]
        action = parse_qs(environ.get("QUERY_STRING", "")).get("Action", [""])[0]
        if not action and "form-urlencoded" in environ.get("CONTENT_TYPE", ""):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            raw = environ["wsgi.input"].read(length) if length else b""
            environ["wsgi.input"] = io.BytesIO(raw)
            action = parse_qs(raw.decode("utf-8", "replace")).get("Action", [""])[0]
        return client, service, action or "unknown"

    def snapshot(self, *, reset: bool = False) -> dict[str, Any]:
        with self._lock:
            counts: dict[str, dict[str, dict[str, int]]] = {}
            for key, value in self._counts.items():
                client, service, action = key.split("|")
                counts.setdefault(client, {}).setdefault(service, {})[action] = value
            snapshot = {
                "requests": counts,
                "messages_received": dict(self._received),
                "connections": len(self._connections),
            }
            if reset:
                self._counts.clear()
                self._received.clear()
                self._connections.clear()
        return snapshot

    def _control(self, path: str, environ: dict[str, Any], start_response: Any) -> Any:
        is_reset = path == "/__bench/reset" and environ.get("REQUEST_METHOD") == "POST"
        if path not in ("/__bench/counts", "/__bench/reset"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"unknown bench endpoint"]
        payload = json.dumps(self.snapshot(reset=is_reset)).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [payload]


def serve(port: int, *, patch: bool) -> None:
    import logging

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    from bench import moto_patch

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    if patch:
        moto_patch.apply()
        moto_patch.verify()
    app = CountingMiddleware(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    server.daemon_threads = True
    print(json.dumps({"port": server.server_port, "patched": patch}), flush=True)
    server.serve_forever(poll_interval=0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.emulator", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-moto-patch", action="store_true")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(args.port, patch=not args.no_moto_patch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
