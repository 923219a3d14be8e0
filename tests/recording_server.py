"""A moto server on loopback that records every AWS operation it serves (for the IAM test).

The operation comes from the X-Amz-Target header (JSON protocol: SQS and DynamoDB) or the
Action form field (query protocol).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

SERVICE_PREFIXES = {"AmazonSQS": "sqs", "DynamoDB_20120810": "dynamodb"}


class RecordingServer:
    def __init__(self) -> None:
        self.operations: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", 0, self._record, threaded=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="recording-moto", daemon=True
        )

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _record(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if "." in target:
            prefix, action = target.split(".", 1)
            service = SERVICE_PREFIXES.get(prefix, prefix)
        else:
            service, action = "unknown", self._form_action(environ)
        with self._lock:
            self.operations.add((service, action))
        return self._app(environ, start_response)

    @staticmethod
    def _form_action(environ: dict[str, Any]) -> str:
        query = parse_qs(environ.get("QUERY_STRING", ""))
        return (query.get("Action") or ["?"])[0]
