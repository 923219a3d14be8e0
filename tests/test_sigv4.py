"""Our SigV4 against botocore's: the same request at the same time, the same header."""

from __future__ import annotations

import datetime

import pytest
from botocore import auth as botocore_auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from sqsbalancerd.sigv4 import Keys, Signer, host_of

# 2026-03-01T23:59:59Z, a second before the date in the scope changes.
NOW_S = 1772409599.0
HEADERS = {
    "Content-Type": "application/x-amz-json-1.0",
    "x-amzn-query-mode": "true",
    "User-Agent": "sqsbalancerd/test Botocore/x lean",
    "X-Amz-Target": "AmazonSQS.ReceiveMessage",
}
BODY = b'{"QueueUrl":"https://sqs.us-east-1.amazonaws.com/1/q","MaxNumberOfMessages":10}'


def botocore_headers(
    url: str, keys: Keys, now_s: float, monkeypatch: pytest.MonkeyPatch, region: str
) -> dict[str, str]:
    moment = datetime.datetime.fromtimestamp(now_s, datetime.UTC).replace(tzinfo=None)
    monkeypatch.setattr(botocore_auth, "get_current_datetime", lambda: moment)
    request = AWSRequest(method="POST", url=url, data=BODY, headers=dict(HEADERS))
    credentials = Credentials(keys.access_key, keys.secret_key, keys.token)
    botocore_auth.SigV4Auth(credentials, "sqs", region).add_auth(request)
    return dict(request.headers.items())


@pytest.mark.parametrize(
    ("url", "region", "token"),
    [
        ("https://sqs.us-east-1.amazonaws.com", "us-east-1", None),
        ("https://sqs.eu-west-2.amazonaws.com/", "eu-west-2", "FwoGZXIvYXdzE//session+token=="),
        ("http://127.0.0.1:4566", "us-east-1", None),
        ("https://vpce-1.sqs.us-east-1.vpce.amazonaws.com:8443/sqs/", "us-east-1", "t"),
    ],
)
def test_the_authorization_header_is_byte_identical_to_botocores(
    url: str, region: str, token: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = Keys("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    ours = Signer(url, region, "sqs").sign(keys, dict(HEADERS), BODY, now_s=NOW_S)
    theirs = botocore_headers(url, keys, NOW_S, monkeypatch, region)
    assert ours["Authorization"] == theirs["Authorization"]
    assert ours["X-Amz-Date"] == theirs["X-Amz-Date"]
    assert ours.get("X-Amz-Security-Token") == theirs.get("X-Amz-Security-Token")
    assert ours["Host"] == host_of(url)


def test_the_cached_key_follows_a_new_day_and_a_rotated_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "https://sqs.us-east-1.amazonaws.com"
    signer = Signer(url, "us-east-1", "sqs")
    first = Keys("AKID1", "secret-one")
    rotated = Keys("AKID2", "secret-two", "token-two")
    for keys, now_s in ((first, NOW_S), (first, NOW_S + 1), (rotated, NOW_S + 2)):
        ours = signer.sign(keys, dict(HEADERS), BODY, now_s=now_s)
        assert (
            ours["Authorization"]
            == botocore_headers(url, keys, now_s, monkeypatch, "us-east-1")["Authorization"]
        ), (keys, now_s)


def test_the_host_omits_default_ports_and_keeps_others() -> None:
    assert host_of("https://SQS.us-east-1.amazonaws.com:443/") == "sqs.us-east-1.amazonaws.com"
    assert host_of("http://localhost:80") == "localhost"
    assert host_of("http://127.0.0.1:4566") == "127.0.0.1:4566"
    assert host_of("http://[::1]:4566") == "[::1]:4566"
