"""The bench's emulator: moto's server in its own process, counting requests server-side.

    python -m bench.emulator [--port 0] [--no-moto-patch] [--scale] [--http keepalive|close]

prints one JSON line ({"port": ..., "patched": ...}) when it listens on 127.0.0.1, then
serves until SIGTERM. A thin WSGI middleware in front of moto counts every request by
(client, service, action): the action from the X-Amz-Target header (JSON protocol, e.g.
"AmazonSQS.ReceiveMessage", "DynamoDB_20120810.Query") or the Action= field (query
protocol); the service from the SigV4 credential scope; the client is the access key id,
which the harness sets per process ("harness" for its own feeding and checking, one key
per consumer instance), so concurrent processes are counted apart.
It also counts the messages ReceiveMessage returned to each client, and notes requests that
took longer than a second (ReceiveMessage with WaitTimeSeconds excepted): the emulator's own
stalls, so they are not blamed on a consumer.

`--http keepalive` (the default, except with `--scale`) serves moto's WSGI app from waitress:
HTTP/1.1 with persistent connections, as AWS keeps them. moto's own server (werkzeug's, `--http
close`) answers HTTP/1.0 with `Connection: close`, so every request of every consumer paid a
TCP connect (and the consumers' CPU figures that connect's cost) where AWS would not. waitress
serves a request per worker thread and a long poll holds one for its whole wait, so its pool
is sized for the bench's concurrent long polls (`--threads`, 1,000; a request beyond them
waits for a free thread); `--scale` (thousands of long polls) keeps werkzeug's thread per
connection unless `--http keepalive` is given.

`--scale` hosts moto for thousands of long polls (startup_scale, tests/e2e/test_many_queues):
a long poll of an empty queue sleeps until a send or its end (bench.moto_patch
`quiet_long_polls`; moto wakes each one every second, and with 2,000 of them an ownership
read of 2,000 rows took 255 s instead of 11: bench.status_long_polls --quiet),
a table Query visits only its partition (bench.moto_patch `partition_queries`: moto sorts
every item of the table on every Query page, so with 2,000 ownership rows each small read of
the member rows or shard versions sorted 2,000 items), DynamoDB items are written to the
answer as stored (`plain_item_serialisation`: moto walks each attribute value through the
service model), moto's per-request routing is computed once (`cached_dispatch`: it
listed its package's ~150 folders and a class's methods on every request), and DynamoDB
pages are cut at 16 KB (~160 rows) instead of 1 MB (moto
spent ~0.5 ms per item serialising a page: a 1 MB page of ownership rows took 4-5 s, past
the daemons' table read timeout of at most 5 s, where AWS answers in tens of ms).
`--switch-interval S` sets the interpreter's GIL hand-off (CPython's 5 ms by default;
100 ms helped stock moto's waking polls, but with quiet ones it only delays every answer:
member rows 0.05 s at 5 ms, 4.0 s at 100 ms). These change the emulator's speed, not its
answers: the daemons page with LastEvaluatedKey either way (more Query calls than on AWS,
which the DynamoDB counts show).

    GET  /__bench/counts   the counters as JSON
    POST /__bench/reset    the counters as JSON, then zeroed
    POST /__bench/fill     {"queue": name, "count": n, "body": text}: send n messages
                           in process (no HTTP per batch: preloading deep queues fast);
                           answers {"ids": [...], "sent_at": unix time}
    POST /__bench/create   {"queues": {name: {attribute: value}}}: create the queues in
                           process, as CreateQueue would (thousands in seconds, not minutes
                           of HTTP on a loaded emulator); answers {"arns": {name: arn}}
"""

from __future__ import annotations

import argparse
import io
import json
import re
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

SLOW_S = 1.0
_CREDENTIAL = re.compile(r"Credential=([^/]+)/[^/]+/[^/]+/([^/]+)/")


class CountingMiddleware:
    def __init__(self, app: Any) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._received: Counter[str] = Counter()
        self._slow: list[dict[str, Any]] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/__bench/"):
            return self._control(path, environ, start_response)
        client, service, action = self._classify(environ)
        key = f"{client}|{service}|{action}"
        with self._lock:
            self._counts[key] += 1
        started = time.monotonic()
        body = self._app(environ, start_response)
        elapsed = time.monotonic() - started
        if elapsed > SLOW_S and action != "ReceiveMessage":
            with self._lock:
                self._slow.append(
                    {
                        "client": client,
                        "action": action,
                        "s": round(elapsed, 2),
                        "at": round(time.time(), 2),
                    }
                )
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
        client = key_id or "anonymous"  # each consumer process gets its own access key
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
                "slow_requests": list(self._slow[-100:]),
            }
            if reset:
                self._counts.clear()
                self._received.clear()
                self._slow.clear()
        return snapshot

    def _control(self, path: str, environ: dict[str, Any], start_response: Any) -> Any:
        is_post = environ.get("REQUEST_METHOD") == "POST"
        if path == "/__bench/fill" and is_post:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            payload = json.dumps(fill(**json.loads(environ["wsgi.input"].read(length)))).encode()
        elif path == "/__bench/create" and is_post:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            payload = json.dumps(create(**json.loads(environ["wsgi.input"].read(length)))).encode()
        elif path in ("/__bench/counts", "/__bench/reset"):
            payload = json.dumps(self.snapshot(reset=is_post and path.endswith("reset"))).encode()
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"unknown bench endpoint"]
        start_response("200 OK", [("Content-Type", "application/json")])
        return [payload]


def fill(queue: str, count: int, body: str = "{}") -> dict[str, Any]:
    """Send `count` messages to `queue` through moto's backend, as SendMessage would."""
    import time

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.sqs.models import sqs_backends

    backend = sqs_backends[DEFAULT_ACCOUNT_ID]["us-east-1"]
    sent_at = time.time()
    ids = [backend.send_message(queue, body).id for _ in range(count)]
    return {"ids": ids, "sent_at": sent_at}


def create(queues: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Create each queue with its attributes through moto's backend, as CreateQueue would."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.sqs.models import sqs_backends

    backend = sqs_backends[DEFAULT_ACCOUNT_ID]["us-east-1"]
    arns = {
        name: backend.create_queue(name, None, **attributes).queue_arn
        for name, attributes in queues.items()
    }
    return {"arns": arns}


SCALE_DYNAMODB_PAGE_BYTES = 16 * 1024


def host_for_scale() -> None:
    """See `--scale` in the module docstring."""
    import moto.dynamodb.models.table as dynamodb_table

    from bench import moto_patch

    moto_patch.quiet_long_polls()
    moto_patch.verify_quiet_long_polls()
    moto_patch.partition_queries()
    moto_patch.verify_partition_queries()
    moto_patch.plain_item_serialisation()
    moto_patch.verify_plain_item_serialisation()
    moto_patch.cached_dispatch()
    moto_patch.verify_cached_dispatch()
    dynamodb_table.RESULT_SIZE_LIMIT = SCALE_DYNAMODB_PAGE_BYTES  # type: ignore[attr-defined]


KEEPALIVE_THREADS = 1000
# waitress closes a connection idle this long (its default, 120 s, is also AWS-like).
KEEPALIVE_IDLE_S = 120


def serve(
    port: int,
    *,
    patch: bool,
    scale: bool = False,
    switch_interval_s: float | None = None,
    http: str = "keepalive",
    threads: int = KEEPALIVE_THREADS,
) -> None:
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    from bench import moto_patch

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    if patch:
        moto_patch.apply()
        moto_patch.verify()
    if scale:
        host_for_scale()
    if switch_interval_s is not None:
        sys.setswitchinterval(switch_interval_s)
    app = CountingMiddleware(DomainDispatcherApplication(create_backend_app))
    info = {"patched": patch, "scale": scale, "http": http}
    if http == "keepalive":
        _serve_keepalive(app, port, threads=threads, info=info)
    else:
        _serve_connection_close(app, port, info=info)


def _serve_keepalive(app: Any, port: int, *, threads: int, info: dict[str, Any]) -> None:
    import logging

    import waitress

    # "Task queue depth" warnings are the long polls themselves waiting: not news here.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    server: Any = waitress.create_server(
        app,
        host="127.0.0.1",
        port=port,
        threads=threads,
        connection_limit=threads * 4,  # idle keep-alive connections hold no thread
        channel_timeout=KEEPALIVE_IDLE_S,
        asyncore_use_poll=True,  # select() stops at 1,024 descriptors
        backlog=2048,
        ident="bench-emulator",
    )
    print(json.dumps({"port": server.effective_port, **info}), flush=True)
    server.run()


def _serve_connection_close(app: Any, port: int, *, info: dict[str, Any]) -> None:
    """moto's own server: werkzeug, HTTP/1.0, a thread per connection, `Connection: close`."""
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    server.daemon_threads = True
    print(json.dumps({"port": server.server_port, **info}), flush=True)
    server.serve_forever(poll_interval=0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.emulator", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-moto-patch", action="store_true")
    parser.add_argument("--scale", action="store_true", help="host thousands of long polls")
    parser.add_argument("--switch-interval", type=float, default=None, help="GIL hand-off, s")
    parser.add_argument(
        "--http",
        choices=("keepalive", "close"),
        default=None,
        help="keepalive: waitress, HTTP/1.1 (default without --scale); close: moto's werkzeug",
    )
    parser.add_argument("--threads", type=int, default=KEEPALIVE_THREADS, help="keepalive pool")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(
        args.port,
        patch=not args.no_moto_patch,
        scale=args.scale,
        switch_interval_s=args.switch_interval,
        http=args.http or ("close" if args.scale else "keepalive"),
        threads=args.threads,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
