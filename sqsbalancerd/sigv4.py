"""AWS Signature Version 4 for the lean data plane's POSTs (dataplane.py).

Only what those requests need: a POST to one fixed endpoint path, no query string, a small
fixed header set, the payload hashed (as botocore does for SigV4 services). The derived
signing key depends only on the secret key and the date (region and service are fixed per
signer), so it is computed once per secret per UTC day instead of four HMACs per request.
tests/test_sigv4.py checks the Authorization header byte for byte against botocore's
`SigV4Auth` for the same request and time.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, urlsplit

_ALGORITHM = "AWS4-HMAC-SHA256"


class Credentials(Protocol):
    """What botocore's `get_frozen_credentials()` gives (a ReadOnlyCredentials tuple)."""

    @property
    def access_key(self) -> str: ...
    @property
    def secret_key(self) -> str: ...
    @property
    def token(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Keys:
    """One set of credentials, as botocore's `get_frozen_credentials()` gives them."""

    access_key: str
    secret_key: str
    token: str | None = None


def host_of(url: str) -> str:
    """The Host header botocore signs: lowercase, without userinfo or a default port."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    if parts.port is not None and parts.port != {"http": 80, "https": 443}.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


def canonical_path(url: str) -> str:
    """The endpoint's path as SigV4 canonicalises it ("/" when it has none)."""
    path = urlsplit(url).path or "/"
    return quote(path, safe="/~")


class Signer:
    """Signs POSTs to one endpoint for one region and service; thread-safe (the cached key
    is replaced in one assignment)."""

    def __init__(self, url: str, region: str, service: str) -> None:
        self._host = host_of(url)
        self._path = canonical_path(url)
        self._region = region
        self._service = service
        self._scope_tail = f"{region}/{service}/aws4_request"
        self._cached: tuple[str, str, bytes] = ("", "", b"")  # (secret, date, signing key)
        self._date: tuple[int, str] = (-1, "")
        self._layouts: dict[tuple[str, ...], tuple[str, tuple[tuple[str, str], ...]]] = {}

    @property
    def host(self) -> str:
        return self._host

    def sign(
        self, keys: Credentials, headers: dict[str, str], body: bytes, *, now_s: float | None = None
    ) -> dict[str, str]:
        """`headers` (names as sent) plus Host, X-Amz-Date, the session token and the
        Authorization header. Headers botocore leaves unsigned (User-Agent) stay unsigned."""
        amz_date = self._amz_date(now_s)
        out = dict(headers)
        out["Host"] = self._host
        out["X-Amz-Date"] = amz_date
        if keys.token:
            out["X-Amz-Security-Token"] = keys.token
        names, order = self._layout(tuple(out))
        canonical_headers = "".join(
            f"{lowered}:{' '.join(out[name].split())}\n" for lowered, name in order
        )
        body_hash = hashlib.sha256(body).hexdigest()
        canonical = f"POST\n{self._path}\n\n{canonical_headers}\n{names}\n{body_hash}"
        date = amz_date[:8]
        scope = f"{date}/{self._scope_tail}"
        to_sign = f"{_ALGORITHM}\n{amz_date}\n{scope}\n{_sha256_hex(canonical)}"
        signature = hmac.digest(self._key(keys.secret_key, date), to_sign.encode(), "sha256")
        out["Authorization"] = (
            f"{_ALGORITHM} Credential={keys.access_key}/{scope}, "
            f"SignedHeaders={names}, Signature={signature.hex()}"
        )
        return out

    def _amz_date(self, now_s: float | None) -> str:
        """The X-Amz-Date stamp, formatted once per second (every call in it shares it)."""
        second = int(time.time() if now_s is None else now_s)
        cached_second, stamp = self._date
        if second != cached_second:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second))
            self._date = (second, stamp)
        return stamp

    def _layout(self, sent: tuple[str, ...]) -> tuple[str, tuple[tuple[str, str], ...]]:
        """For a set of header names: SignedHeaders and the (lowercase, as sent) order of
        the canonical headers. The lean calls send one or two sets: computed once each."""
        layout = self._layouts.get(sent)
        if layout is None:
            order = tuple(sorted((n.lower(), n) for n in sent if n.lower() not in _UNSIGNED))
            layout = (";".join(lowered for lowered, _ in order), order)
            self._layouts[sent] = layout
        return layout

    def _key(self, secret: str, date: str) -> bytes:
        cached_secret, cached_date, key = self._cached
        if cached_secret == secret and cached_date == date:
            return key
        key = _hmac(f"AWS4{secret}".encode(), date)
        for part in (self._region, self._service, "aws4_request"):
            key = _hmac(key, part)
        self._cached = (secret, date, key)  # a rotated secret or a new day: derived again
        return key


# As botocore's SIGNED_HEADERS_BLACKLIST (those a lean request can carry).
_UNSIGNED = frozenset({"user-agent", "expect", "connection", "x-amzn-trace-id", "authorization"})


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.digest(key, message.encode(), "sha256")


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
