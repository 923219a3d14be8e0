"""Handler faults: BaseExceptions, odd return values, a hang past max_extension, poison.

All real: `sqsbalancerd run` subprocesses running tests/handlers.py:faults against the moto
server (moto really keeps a message invisible for its visibility timeout, counts receives and
moves a message to its dead-letter queue after maxReceiveCount).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import pytest
from support import queue_depth, read_events, wait_until

from sqsbalancerd.local import create_queues, free_port

pytestmark = pytest.mark.faults


def config(pattern: str, *, extra: str = "", pool_size: int = 4, http_port: int = 0) -> str:
    return f"""
handler = "handlers:faults"
coordination.mode = "standalone"
[discovery]
queue_pattern = "{pattern}"
[sqs]
wait_time_seconds = 1
[workers]
pool_size = {pool_size}
[retry]
base = 0
[observability]
http_port = {http_port}
log_format = "json"
{extra}
"""


def json_lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def summary_of(log: str) -> dict[str, Any]:
    return [line for line in json_lines(log) if line.get("msg", "").startswith("stopped")][-1]


def send(sqs: Any, url: str, body: dict[str, Any]) -> str:
    return str(sqs.send_message(QueueUrl=url, MessageBody=json.dumps(body))["MessageId"])


def by_id(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        grouped.setdefault(event["id"], []).append(event)
    return grouped


def ok_ids(events: list[dict[str, Any]]) -> Counter[str]:
    return Counter(e["id"] for e in events if e["event"] == "end" and e.get("outcome") == "ok")


@pytest.mark.timeout(90)
def test_base_exceptions_fail_one_message_and_odd_return_values_are_defined(sqs, daemons):
    """SystemExit / KeyboardInterrupt from a handler fail that message only (retried, the
    process and its worker go on). Return values of a (non-batch) handler: None, False and a
    dict all mean success (deleted once); a coroutine object returned by a sync function is
    awaited (on the handlers' loop, or in the worker thread when the daemon has none) and its
    outcome is the message's outcome. A batch handler returning something undocumented
    (False, 0, a mapping without batchItemFailures) fails its whole batch: nothing is
    deleted on an answer the daemon cannot read."""
    urls = create_queues(sqs, ["hf-raise", "hf-odd"], dead_letter=False)
    batch_urls = create_queues(sqs, ["hfb-false", "hfb-zero", "hfb-dict"], dead_letter=False)
    batches = {
        name: send(sqs, url, {"batch_returns": name.removeprefix("hfb-")})
        for name, url in batch_urls.items()
    }
    raising = {
        kind: send(sqs, urls["hf-raise"], {"raise": kind})
        for kind in ("SystemExit", "KeyboardInterrupt")
    }
    plain = {send(sqs, urls["hf-raise"], {}) for _ in range(3)}
    odd = {
        kind: send(sqs, urls["hf-odd"], {"returns": kind})
        for kind in ("none", "false", "dict", "coroutine")
    }
    override = '[[queue]]\nmatch = "^hfb-"\nhandler = "handlers:faults_batch"\n'
    daemon = daemons.start(config=config("^hfb?-", extra=override))
    every = set(raising.values()) | plain | set(odd.values())
    wait_until(
        lambda: set(ok_ids(read_events(daemons.events_path))) >= every,
        timeout_s=60,
        what="every message handled",
    )
    wait_until(
        lambda: all(queue_depth(sqs, u) == (0, 0) for u in [*urls.values(), *batch_urls.values()]),
        timeout_s=30,
        what="every message deleted",
    )
    daemon.terminate()
    assert daemon.wait(timeout_s=30) == 0, daemon.log()

    events = read_events(daemons.events_path)
    history = by_id(events)
    assert {e["pid"] for e in events} == {daemon.proc.pid}
    for kind, message_id in raising.items():
        ends = [
            (e["receive_count"], e["outcome"], e.get("error"))
            for e in history[message_id]
            if e["event"] == "end"
        ]
        assert ends == [(1, "failed", kind), (2, "ok", None)], (kind, ends)
    failures = [line for line in json_lines(daemon.log()) if line["msg"] == "handler failed"]
    raised = [line for line in failures if line["queue"] == "hf-raise"]
    assert sorted(line["error"].split(":")[0] for line in raised) == sorted(raising)
    assert all("exc" not in line for line in raised)  # no traceback for these two
    starts = Counter(e["id"] for e in events if e["event"] == "start")
    assert {name: starts[i] for name, i in batches.items()} == {
        "hfb-false": 2,
        "hfb-zero": 2,
        "hfb-dict": 2,
    }
    unreadable = [line for line in json_lines(daemon.log()) if "answer unreadable" in line["msg"]]
    assert sorted(line["error"].split(" ")[0] for line in unreadable) == ["a", "bool", "int"]

    ok = ok_ids(events)
    for kind, message_id in odd.items():
        assert ok[message_id] == 1, (kind, history[message_id])
        starts = [e for e in history[message_id] if e["event"] == "start"]
        assert len(starts) == 1, (kind, history[message_id])
    awaited = [e for e in history[odd["coroutine"]] if e["event"] == "awaited"]
    assert len(awaited) == 1
    summary = summary_of(daemon.log())
    # Failed: the two raising messages and the three batches whose answer was unreadable.
    assert summary["deleted"] == len(every) + 3 and summary["failed"] == 5
    print(
        f"\nSystemExit/KeyboardInterrupt: failed once each, retried, handled (process "
        f"{daemon.proc.pid} throughout); None/False/dict: deleted once; coroutine from a "
        f"sync function: awaited once, deleted; batch returning False/0/a dict: failed, "
        f"retried, deleted on the retry; summary "
        f"{summary['deleted']} deleted, {summary['failed']} failed"
    )


def get_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:  # not listening (yet)
        return 0


@pytest.mark.timeout(90)
def test_handler_hanging_past_max_extension(sqs, daemons):
    """visibility_timeout 2 s, max_extension 3 s, one worker: a handler hanging 8 s stops
    being extended at 3 s, so the message reappears (receive count grows); the slot counts as
    stuck and, being the only one, /healthz answers 503; the late result is discarded (not
    deleted by the hung run); a later receive handles and deletes it. Real: moto's
    visibility timeout and receive count."""
    url = create_queues(sqs, ["hang-a"], dead_letter=False)["hang-a"]
    port = free_port()
    extra = "[sqs]\nvisibility_timeout = 2\nmax_extension = 3\n"
    daemon = daemons.start(
        config=config("^hang-", pool_size=1, http_port=port).replace("[sqs]\n", extra)
    )
    wait_until(
        lambda: get_status(port, "/healthz") == 200, timeout_s=30, what="the daemon to be healthy"
    )
    message_id = send(sqs, url, {"hang_once": 8})
    wait_until(
        lambda: any(e["event"] == "start" for e in read_events(daemons.events_path)),
        timeout_s=30,
        what="the handler to start",
    )
    started = time.monotonic()
    wait_until(
        lambda: get_status(port, "/healthz") == 503,
        timeout_s=15,
        every_s=0.1,
        what="/healthz to fail with the only slot stuck",
    )
    unhealthy_s = time.monotonic() - started
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    stuck = [line for line in metrics.splitlines() if line.startswith("sqsbalancerd_stuck")]
    wait_until(
        lambda: ok_ids(read_events(daemons.events_path))[message_id] >= 2,
        timeout_s=40,
        what="the late result and a later handling",
    )
    wait_until(lambda: queue_depth(sqs, url) == (0, 0), timeout_s=10, what="deleted")
    wait_until(
        lambda: get_status(port, "/healthz") == 200, timeout_s=10, what="/healthz to recover"
    )
    daemon.terminate()
    assert daemon.wait(timeout_s=30) == 0, daemon.log()

    events = [e for e in read_events(daemons.events_path) if e["id"] == message_id]
    ends = [(e["receive_count"], e["outcome"]) for e in events if e["event"] == "end"]
    assert ends[0] == (1, "ok")  # the hung run returned ... and its result was discarded:
    assert ends[-1][0] >= 2 and len(ends) == 2, ends
    lines = json_lines(daemon.log())
    assert [line for line in lines if line["msg"].startswith("handler returned after")]
    assert [line for line in lines if line["msg"].startswith("message reached max_extension")]
    summary = summary_of(daemon.log())
    assert summary["deleted"] == 1 and summary["expired"] >= 1, summary
    assert any(line.rstrip().endswith(" 1.0") for line in stuck), stuck
    print(
        f"\nhang past max_extension=3s: /healthz 503 {unhealthy_s:.1f}s after the start; "
        f"reappeared, handled again at receive count {ends[-1][0]}; first result discarded; "
        f"deleted once ({summary['expired']} expiries); {stuck}"
    )


@pytest.mark.timeout(90)
def test_poison_message_ends_in_the_dead_letter_queue(sqs, daemons):
    """A message that always fails, on a queue whose redrive policy says maxReceiveCount 3:
    handled exactly 3 times, then moto moves it to the DLQ. At start, one warning for the
    owned queue without a redrive policy, none for the others; the DLQ is not consumed."""
    urls = create_queues(sqs, ["poison-a"], max_receive_count=3)
    bare = create_queues(sqs, ["poison-bare"], dead_letter=False)["poison-bare"]
    message_id = send(sqs, urls["poison-a"], {"fail_always": True})
    daemon = daemons.start(config=config("^poison-"))
    dlq = sqs.get_queue_url(QueueName="poison-a-dlq")["QueueUrl"]
    wait_until(
        lambda: queue_depth(sqs, dlq) == (1, 0), timeout_s=60, what="the poison message in the DLQ"
    )
    assert queue_depth(sqs, urls["poison-a"]) == (0, 0)
    daemon.terminate()
    assert daemon.wait(timeout_s=30) == 0, daemon.log()

    starts = [
        e["receive_count"]
        for e in read_events(daemons.events_path)
        if e["event"] == "start" and e["id"] == message_id
    ]
    assert starts == [1, 2, 3]
    moved = sqs.receive_message(QueueUrl=dlq)["Messages"]
    assert [m["MessageId"] for m in moved] == [message_id]
    lines = json_lines(daemon.log())
    warned = [line["queue"] for line in lines if "no redrive policy" in line["msg"]]
    assert warned == ["poison-bare"]
    consumed = {line["queue"] for line in lines if line["msg"] == "consuming queue"}
    assert consumed == {"poison-a", "poison-bare"}
    assert queue_depth(sqs, bare) == (0, 0)
    print(
        f"\npoison message: handled {len(starts)} times (maxReceiveCount 3), then in the DLQ;"
        " no-redrive warning for poison-bare only"
    )
