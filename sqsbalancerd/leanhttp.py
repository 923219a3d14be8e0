"""How the lean data plane (dataplane.py) puts a signed POST on the wire.

`DirectTransport`: one persistent HTTP/1.1 connection per thread (a poller's long polls and
the acks thread's batches each keep theirs), signed by `sigv4.Signer`. A reused
connection that fails before any answer arrived — the server closed it while idle — is
reopened and the request sent once more, as urllib3 does for a stale pooled connection;
any other failure raises botocore's error for it (`EndpointConnectionError`,
`ConnectTimeoutError`, `SSLError`, `ReadTimeoutError`, `ConnectionClosedError`).

`SessionTransport`: botocore's `SigV4Auth` and the client's own HTTP session (urllib3), for
what the direct one does not do: proxies, client certificates, a CA directory.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import (
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
    SSLError,
)
from botocore.httpsession import get_cert_path

from sqsbalancerd.sigv4 import Signer

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Answer:
    status_code: int
    content: bytes
    headers: dict[str, str]  # names lowercase


class Transport(Protocol):
    def send(self, credentials: Any, headers: dict[str, str], body: bytes) -> Answer: ...

    def close(self) -> None: ...


class SessionTransport:
    """botocore's signer and HTTP session: its proxies, CA bundle, pool and timeouts."""

    def __init__(self, url: str, region: str, http_session: Any) -> None:
        self._url = url
        self._region = region
        self._http = http_session

    def send(self, credentials: Any, headers: dict[str, str], body: bytes) -> Answer:
        request = AWSRequest(method="POST", url=self._url, data=body, headers=headers)
        SigV4Auth(credentials, "sqs", self._region).add_auth(request)
        response = self._http.send(request.prepare())
        lowered = {k.lower(): v for k, v in response.headers.items()}
        return Answer(response.status_code, response.content or b"", lowered)

    def close(self) -> None:
        pass  # the session belongs to the boto3 client


@dataclass(frozen=True, slots=True)
class Options:
    connect_timeout_s: float
    read_timeout_s: float
    tcp_keepalive: bool = False
    tls: ssl.SSLContext | None = None  # None: plain HTTP


class _Held:
    """A thread's connection: the socket and one buffered reader for all its answers
    (closed when the thread's locals go, without a ResourceWarning)."""

    __slots__ = ("reader", "sock", "uses")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")
        self.uses = 0

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __del__(self) -> None:
        self.close()


class DirectTransport:
    """HTTP/1.1 by hand: one sendall per request, a status line, headers and a body read
    from a buffered reader (http.client parses every answer's headers with the email
    package and sends head and body in two writes: most of a call's CPU here)."""

    def __init__(self, url: str, region: str, options: Options) -> None:
        parts = urlsplit(url)
        self._url = url
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if options.tls else 80)
        self._request_line = f"POST {parts.path or '/'} HTTP/1.1\r\n"
        self._options = options
        self._signer = Signer(url, region, "sqs")
        self._local = threading.local()
        self.connects = 0  # connections opened (tests count them)

    def send(self, credentials: Any, headers: dict[str, str], body: bytes) -> Answer:
        signed = self._signer.sign(credentials, headers, body)
        head = "".join(f"{name}: {value}\r\n" for name, value in signed.items())
        request = f"{self._request_line}{head}Content-Length: {len(body)}\r\n\r\n".encode()
        request += body
        held: _Held | None = getattr(self._local, "held", None)
        if held is not None:  # kept only after an answer: a reused connection
            try:
                return self._exchange(held, request, is_reused=True)
            except _Stale:
                pass  # closed by the server while idle: once more, on a new one
        return self._exchange(self._open(), request, is_reused=False)

    def close(self) -> None:
        held: _Held | None = getattr(self._local, "held", None)
        self._local.held = None
        if held is not None:
            held.close()

    def _open(self) -> _Held:
        options = self._options
        address = (self._host, self._port)
        try:
            sock = socket.create_connection(address, timeout=options.connect_timeout_s)
        except TimeoutError as exc:
            raise ConnectTimeoutError(endpoint_url=self._url, error=exc) from exc
        except OSError as exc:  # refused, unreachable
            raise EndpointConnectionError(endpoint_url=self._url, error=exc) from exc
        if options.tls is not None:
            sock = self._handshake(sock, options.tls)
        sock.settimeout(options.read_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if options.tcp_keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.connects += 1
        return _Held(sock)

    def _handshake(self, sock: socket.socket, tls: ssl.SSLContext) -> socket.socket:
        try:
            return tls.wrap_socket(sock, server_hostname=self._host)
        except ssl.SSLError as exc:  # a certificate that does not verify, among others
            sock.close()
            raise SSLError(endpoint_url=self._url, error=exc) from exc
        except TimeoutError as exc:
            sock.close()
            raise ConnectTimeoutError(endpoint_url=self._url, error=exc) from exc
        except OSError as exc:
            sock.close()
            raise EndpointConnectionError(endpoint_url=self._url, error=exc) from exc

    def _exchange(self, held: _Held, request: bytes, *, is_reused: bool) -> Answer:
        self._local.held = None  # kept again only once a whole answer was read
        try:
            held.sock.sendall(request)
            status_line = held.reader.readline(_MAX_LINE)
            if not status_line:
                raise ConnectionResetError("closed before an answer")
        except ConnectionError as exc:  # reset, broken pipe, closed before any answer
            held.close()
            if is_reused:
                raise _Stale from exc
            raise ConnectionClosedError(endpoint_url=self._url, error=exc) from exc
        except OSError as exc:
            held.close()
            raise _network_error(self._url, exc) from exc
        try:
            status, headers, content, is_closing = _read_answer(held.reader, status_line)
        except (OSError, ValueError) as exc:
            held.close()
            raise _network_error(self._url, exc) from exc
        if is_closing:
            held.close()
        else:
            held.uses += 1
            self._local.held = held
        return Answer(status, content, headers)


_MAX_LINE = 65536
_MAX_HEADERS = 100


def _read_answer(reader: Any, status_line: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers with lowercase names, body, whether the server closes): what a
    response says after its status line. Skips 1xx answers."""
    while True:
        version, status = _parse_status(status_line)
        headers = _read_headers(reader)
        if status >= 200:
            break
        status_line = reader.readline(_MAX_LINE)
    connection = headers.get("connection", "").lower()
    is_closing = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return status, headers, _read_chunked(reader), is_closing
    length = headers.get("content-length")
    if length is None:  # the body runs to the end of the connection
        return status, headers, reader.read(), True
    content = reader.read(int(length))
    if len(content) != int(length):
        raise ConnectionResetError(f"answer cut short: {len(content)} of {length} bytes")
    return status, headers, content, is_closing


def _parse_status(line: bytes) -> tuple[str, int]:
    parts = line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"not an HTTP status line: {line[:80]!r}")
    return parts[0], int(parts[1])


def _read_headers(reader: Any) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADERS):
        line = reader.readline(_MAX_LINE)
        if line in (b"\r\n", b"\n"):
            return headers
        if not line:
            raise ConnectionResetError("closed inside the headers")
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    raise ValueError("too many header lines")


def _read_chunked(reader: Any) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int(reader.readline(_MAX_LINE).split(b";", 1)[0].strip(), 16)  # b"": ValueError
        if size == 0:
            while reader.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        chunk = reader.read(size)
        if len(chunk) != size:
            raise ConnectionResetError("chunk cut short")
        parts.append(chunk)
        reader.readline(_MAX_LINE)  # the CRLF after each chunk


class _Stale(Exception):
    """A reused connection the server had closed: nothing was answered."""


def _network_error(url: str, exc: BaseException) -> Exception:
    if isinstance(exc, TimeoutError):
        return ReadTimeoutError(endpoint_url=url, error=exc)
    return ConnectionClosedError(endpoint_url=url, error=exc)


def choose(client: Any, url: str, http_session: Any) -> tuple[Transport, str | None]:
    """The direct transport when it can do what the client's session would, else the
    session's, with why."""
    region = client.meta.region_name
    why = _why_not_direct(url, http_session)
    if why is not None:
        return SessionTransport(url, region, http_session), why
    config = client.meta.config
    verify = http_session._verify
    tls = _tls_context(verify) if url.lower().startswith("https") else None
    options = Options(
        connect_timeout_s=float(config.connect_timeout),
        read_timeout_s=float(config.read_timeout),
        tcp_keepalive=bool(getattr(config, "tcp_keepalive", False)),
        tls=tls,
    )
    return DirectTransport(url, region, options), None


def _why_not_direct(url: str, http_session: Any) -> str | None:
    try:
        proxy = http_session._proxy_config.proxy_url_for(url)
        verify = http_session._verify
        client_cert = http_session._cert_file
    except AttributeError as exc:
        return f"botocore's HTTP session internals missing: {exc}"
    if proxy:
        return "a proxy is configured"
    if client_cert:
        return "a TLS client certificate is configured"
    if isinstance(verify, str) and os.path.isdir(verify):
        return "the CA bundle is a directory"
    if urlsplit(url).scheme not in ("http", "https"):
        return f"endpoint scheme {urlsplit(url).scheme!r}"
    return None


def _tls_context(verify: bool | str | None) -> ssl.SSLContext:
    """As botocore verifies: its CA bundle (certifi's when installed) or the configured one;
    verify=False turns checking off, as it does for botocore."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    cafile = verify if isinstance(verify, str) else str(get_cert_path(True))
    return ssl.create_default_context(cafile=cafile)
