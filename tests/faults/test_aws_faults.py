"""SQS misbehaving under a running daemon, and AWS unreachable at start.

The daemon (`sqsbalancerd run`, standalone mode: one process owns every queue) reaches SQS
through the fault proxy (proxy.py); the test sends and counts through moto directly.
Real (moto): queues, messages, visibility timeouts (a message whose delete never happened
comes back), receive counts, a closed port. Simulated (proxy): throttling, 5xx, replies
lost after the work was done, failed DeleteMessageBatch entries, rejected receipt handles.
Every message id is counted: sent (the feeder's SendMessageBatch answers) against handled
(the `end` events tests/handlers.py records) and what is left in SQS.
"""

from __future__ import annotations

import itertools
import math
import re
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from proxy import (
    Blackhole,
    Drop,
    FailEntries,
    FaultProxy,
    Latency,
    LostReply,
    Record,
    Rule,
    server_error,
    throttle,
    throttling_exception,
)
from support import Feeder, Tally, json_log, queue_depth, read_events, wait_until

from sqsbalancerd.coordination.coordinator import START_RETRY_DELAYS_S
from sqsbalancerd.local import free_port

pytestmark = pytest.mark.faults

VISIBILITY_S = 5  # short: what was received but not deleted comes back soon


def make_queues(sqs: Any, count: int) -> dict[str, str]:
    return {
        f"faults-{n}": sqs.create_queue(
            QueueName=f"faults-{n}", Attributes={"VisibilityTimeout": str(VISIBILITY_S)}
        )["QueueUrl"]
        for n in range(count)
    }


def handled_ok(path: Any) -> set[str]:
    return {e["id"] for e in read_events(path) if e["event"] == "end" and e["outcome"] == "ok"}


def stop_summary(log: str) -> dict[str, Any]:
    return [line for line in json_log(log) if line["msg"].startswith("stopped")][-1]


def drain_fed(
    feeder: Feeder,
    sqs: Any,
    urls: dict[str, str],
    totals: Any,
    *,
    is_handled: Callable[[list[str]], bool],
    what: str,
) -> list[str]:
    """Wait (bounded) until the feeder sent everything, `is_handled(sent)`, and every queue
    is empty; the feeder is stopped whatever happens. Returns the sent message ids."""
    try:
        wait_until(
            feeder.is_finished,
            timeout_s=60 * totals.timeout_scale,
            every_s=0.2,
            what="everything sent",
        )
        sent = feeder.sent_ids()
        wait_until(
            lambda: is_handled(sent), timeout_s=60 * totals.timeout_scale, every_s=0.2, what=what
        )
        for url in urls.values():
            wait_until(lambda u=url: queue_depth(sqs, u) == (0, 0), what="every message deleted")
    finally:
        feeder.stop()
    return sent


def given_up(log: str) -> list[dict[str, Any]]:
    """The daemon's "giving up" lines for deletes (the message will come back)."""
    return [
        line
        for line in json_log(log)
        if line["msg"].startswith("giving up on a message") and line["action"] == "delete"
    ]


def calls(records: list[Record]) -> dict[str, list[Record]]:
    """Attempts grouped by botocore invocation id (one logical call), in order. A request
    without one (sent without botocore) is a call of its own."""
    grouped: dict[str, list[Record]] = defaultdict(list)
    for n, record in enumerate(sorted(records, key=lambda r: r.started)):
        grouped[record.invocation or f"no-invocation-{n}"].append(record)
    return grouped


def retry_figures(proxy: FaultProxy, action: str) -> dict[str, Any]:
    """How botocore retried the calls that met a failure (an error status or no answer; not
    mere latency): recovered, exhausted, and the backoff between attempts. Only botocore's
    requests (a request sent without botocore that fails is sent again through it)."""
    recovered, exhausted, gaps = [], [], []
    records = [r for r in proxy.records("sqs", action) if r.invocation]
    for attempts in calls(records).values():
        if all(a.status == 200 for a in attempts):
            continue
        gaps += [b.started - a.ended for a, b in itertools.pairwise(attempts)]
        (exhausted if attempts[-1].status != 200 else recovered).append(attempts)
    return {
        "recovered": len(recovered),
        "exhausted": len(exhausted),
        "exhausted_entries": sum(a[-1].entries for a in exhausted),
        "exhausted_early": sum(len(a) < 5 for a in exhausted),  # retry quota ran dry
        "max_attempts": max((len(a) for a in recovered + exhausted), default=0),
        "backoff_max_s": round(max(gaps, default=0.0), 2),
        "backoff_mean_s": round(sum(gaps) / max(1, len(gaps)), 2),
    }


def ack_retries(proxy: FaultProxy, action: str) -> dict[str, Any]:
    """How the daemon's acks thread retried `action` (its client makes one attempt per call,
    so a retry is a new call): calls that failed (an error status or no answer), their
    entries, later calls carrying a message of a failed one, and the messages of failed
    calls that no later call got done.

    The acks client's lean requests are not re-sent through botocore on failure (the acks
    thread retries), so every request counts, with or without `sqs.lean_requests`.
    """
    records = sorted(proxy.records("sqs", action), key=lambda r: r.started)
    botocore_records = [r for r in records if r.invocation]
    failed_at: dict[str, float] = {}  # message id -> when its first failed call ended
    done: set[str] = set()
    failed_calls = failed_entries = retried_calls = 0
    for record in records:
        ids = set(record.message_ids) - {"?"}
        if any(failed_at.get(m, math.inf) <= record.started for m in ids):
            retried_calls += 1
        if record.status == 200:
            done |= ids - set(record.failed_ids)
            continue
        failed_calls += 1
        failed_entries += record.entries
        for message_id in ids:
            failed_at.setdefault(message_id, record.ended)
    return {
        "failed_calls": failed_calls,
        "failed_entries": failed_entries,
        "retried_calls": retried_calls,
        "unrecovered": sorted(set(failed_at) - done),
        "attempts_per_call": max((len(a) for a in calls(botocore_records).values()), default=0),
    }


def explain_duplicates(
    proxy: FaultProxy, duplicated: dict[str, int], log: str
) -> dict[str, set[str]]:
    """Why a message was handled more than once: the daemon gave its delete up, or its delete
    first got through only after the visibility timeout of the receive that delivered it
    (deletes behind, retried or slow). Anything else is unexplained (a bug)."""
    first_receive: dict[str, float] = {}
    for record in proxy.records("sqs", "ReceiveMessage"):
        for message_id in record.message_ids:
            first_receive[message_id] = min(first_receive.get(message_id, math.inf), record.ended)
    first_delete: dict[str, float] = {}
    for record in proxy.records("sqs", "DeleteMessageBatch"):
        if record.status != 200:
            continue
        for message_id in set(record.message_ids) - set(record.failed_ids):
            first_delete[message_id] = min(first_delete.get(message_id, math.inf), record.started)
    late = {
        m
        for m in duplicated
        if first_delete.get(m, math.inf) - first_receive.get(m, 0.0) >= VISIBILITY_S - 0.5
    }
    gave_up = set(duplicated) & {line["message_id"] for line in given_up(log)}
    return {
        "delete given up": gave_up,
        "delete late": late - gave_up,
        "unexplained": set(duplicated) - late - gave_up,
    }


def timeline(proxy: FaultProxy, message_ids: set[str]) -> list[str]:
    """Each message's receives and deletes as the proxy saw them (for failure messages)."""
    lines = []
    for message_id in sorted(message_ids)[:5]:
        seen = [
            f"{r.action}@{r.started:.2f}-{r.ended:.2f} {r.status} {r.fault or ''}"
            for r in proxy.records("sqs")
            if message_id in r.message_ids
        ]
        lines.append(f"{message_id}: {seen}")
    return lines


def standalone(fault_config: Any, **kwargs: Any) -> str:
    return fault_config(mode="standalone", pool_size=8, queue_size=20, **kwargs)


@pytest.mark.timeout(120)
def test_sqs_throttling_and_5xx_bursts_are_retried_and_nothing_is_dropped(
    sqs, endpoint, daemons, proxies, fault_config, totals
):
    """Simulated: RequestThrottled / ThrottlingException (400), 500 and 503 bursts on
    ReceiveMessage and DeleteMessageBatch, 0.3 s of added latency on some receives, and
    ReceiveMessage replies lost after moto handed the messages out. Receives: botocore
    retries, and one burst exhausts its 5 attempts (the poller's backoff takes over).
    Deletes: the acks client makes one attempt per call, so the acks thread retries (a
    new call, after its own backoff) and other queues' deletes are not held up meanwhile.
    Real: messages whose reply was lost come back after their visibility timeout (receive
    count 2) and are handled then. Duplicates are counted and explained (a delete given
    up, or sent after the visibility timeout); none in short mode."""
    urls = make_queues(sqs, totals.sqs_queues)
    proxy = proxies.start("sqs")
    lost_replies = proxy.add(Rule("sqs", "ReceiveMessage", LostReply(500), times=3, period=10))
    # Six 503s in a row: one receive (a poller is serial) spends its lean attempt and
    # botocore's 5; the acks thread meets five as five failed calls, retried by itself.
    receive_burst = {"times": 6, "period": 10**9, "burst": 6}
    burst = {"times": 5, "period": 10**9, "burst": 5}
    proxy.add(Rule("sqs", "ReceiveMessage", server_error(503), queue="faults-0", **receive_burst))
    proxy.add(Rule("sqs", "DeleteMessageBatch", server_error(503), **burst))
    # Bursts, not a storm: botocore's retry quota (500, a 5xx retry costs 14) would run dry
    # for the pollers' client.
    proxy.add(Rule("sqs", "ReceiveMessage", throttle("sqs"), period=10, burst=2))
    proxy.add(Rule("sqs", "ReceiveMessage", server_error(500), period=29, burst=2))
    proxy.add(Rule("sqs", "DeleteMessageBatch", throttling_exception(), period=8, burst=1))
    proxy.add(Rule("sqs", "DeleteMessageBatch", server_error(503), period=17, burst=2))
    proxy.add(Rule("sqs", "ReceiveMessage", Latency(0.3), period=13))
    feeder = Feeder(endpoint, urls, total=totals.sqs_messages, depth=totals.queue_depth)
    feeder.start()
    daemon = daemons.start(config=standalone(fault_config), env=proxy.env(("sqs",)))
    sent = drain_fed(
        feeder,
        sqs,
        urls,
        totals,
        is_handled=lambda ids: set(ids) <= handled_ok(daemons.events_path),
        what="every message handled",
    )
    daemon.terminate()
    assert daemon.wait(timeout_s=30) == 0, daemon.log()

    log = daemon.log()
    events = read_events(daemons.events_path)
    tally = Tally(sent, events)
    receive, delete = (
        retry_figures(proxy, "ReceiveMessage"),
        ack_retries(proxy, "DeleteMessageBatch"),
    )
    summary = stop_summary(log)
    backed_off = [line for line in json_log(log) if line["msg"] == "receive failed; backing off"]
    injected = {k: n for k, n in proxy.counts().items() if k[2] != "ok"}
    print(f"\nSQS throttling/5xx: {tally.figures()}; injected {sum(injected.values())}: {injected}")
    print(
        f"ReceiveMessage calls: {receive}; DeleteMessageBatch calls: "
        f"{ {k: v for k, v in delete.items() if k != 'unrecovered'} }"
    )
    print(
        f"daemon: ack_retried={summary['ack_retried']} delete_failed={summary['delete_failed']} "
        f"receive backoffs={len(backed_off)}; replies lost after moto handed out "
        f"{len(lost_replies.message_ids)} messages"
    )
    causes = explain_duplicates(proxy, tally.duplicated, log)
    print(f"duplicates by cause: { {k: len(v) for k, v in causes.items()} }")
    assert not tally.lost and not tally.unknown
    assert tally.handled == tally.sent == totals.sqs_messages
    assert not causes["unexplained"], timeline(proxy, causes["unexplained"])
    # Receives: botocore retried with (jittered) backoff; calls past its 5 attempts were
    # retried by the poller after a backoff.
    assert receive["recovered"] > 0
    assert receive["exhausted"] >= 1
    assert len(backed_off) == receive["exhausted"]
    assert {line["error"].split(":")[0] for line in backed_off} <= {
        "ServiceUnavailable",
        "RequestThrottled",
        "InternalFailure",
    }
    # Deletes: one attempt per call (no botocore retry holding up the acks thread); the acks
    # thread retried every entry of every failed call (ack_retried) until it got through.
    assert delete["attempts_per_call"] <= 1  # botocore's, if any: 0 when every call is lean
    assert delete["failed_calls"] > 0 and delete["retried_calls"] > 0
    assert not delete["unrecovered"], delete["unrecovered"][:5]
    assert summary["ack_retried"] == delete["failed_entries"]
    assert summary["delete_failed"] == 0 and not given_up(log)
    # Replies lost after the receive happened: those messages came back and were handled.
    came_back = {e["id"]: e["receive_count"] for e in events if e["event"] == "start"}
    assert lost_replies.injected == 3 and lost_replies.message_ids
    assert all(came_back[m] >= 2 for m in lost_replies.message_ids)


@pytest.mark.timeout(120)
def test_partial_delete_batch_failure_is_retried_and_counted(
    sqs, endpoint, daemons, proxies, fault_config, totals
):
    """Simulated: DeleteMessageBatch answers 200 with some entries under "Failed"
    (InternalError, SenderFault false); the proxy really leaves those undeleted. The daemon
    retries exactly those entries (ack_retried, in /metrics and the stop summary); nothing
    is redelivered because of it."""
    urls = make_queues(sqs, totals.sqs_queues)
    proxy = proxies.start("sqs")
    rule = proxy.add(Rule("sqs", "DeleteMessageBatch", FailEntries(per_batch=2), period=2))
    port = free_port()
    feeder = Feeder(endpoint, urls, total=totals.sqs_messages, depth=totals.queue_depth)
    feeder.start()
    daemon = daemons.start(config=standalone(fault_config, http_port=port), env=proxy.env(("sqs",)))
    sent = drain_fed(
        feeder,
        sqs,
        urls,
        totals,
        is_handled=lambda ids: set(ids) <= handled_ok(daemons.events_path),
        what="every message handled",
    )
    metrics = metric_totals(port)
    daemon.terminate()
    assert daemon.wait(timeout_s=30) == 0, daemon.log()

    log = daemon.log()
    events = read_events(daemons.events_path)
    tally = Tally(sent, events)
    summary = stop_summary(log)
    print(
        f"\npartial DeleteMessageBatch failure: {tally.figures()}; entries failed by the "
        f"proxy {rule.entries_failed} in {rule.injected} batches; daemon ack_retried="
        f"{summary['ack_retried']} (/metrics {metrics['ack_retried']}), delete_failed="
        f"{summary['delete_failed']}, deleted={summary['deleted']}"
    )
    assert not tally.lost and not tally.unknown
    assert tally.handled == tally.sent == totals.sqs_messages
    assert rule.entries_failed > 0
    # Every failed entry was retried once (the proxy fails a message's entry only once).
    assert summary["ack_retried"] == rule.entries_failed
    assert metrics["ack_retried"] == summary["ack_retried"]
    # One delete per successful handling; a give-up is moto refusing a message handled twice.
    handlings = tally.handled + sum(tally.duplicated.values())
    assert summary["deleted"] + summary["delete_failed"] == handlings
    assert {line["message_id"] for line in given_up(log)} <= set(tally.duplicated)
    # Not redelivered because of it: a message handled twice had its delete given up, or
    # deleted late (after its visibility timeout): counted, and none here in short mode.
    causes = explain_duplicates(proxy, tally.duplicated, log)
    print(f"duplicates by cause: { {k: len(v) for k, v in causes.items()} }")
    assert not causes["unexplained"], timeline(proxy, causes["unexplained"])
    again = {e["id"] for e in events if e["event"] == "start" and e["receive_count"] > 1}
    assert again <= set(tally.duplicated)


def metric_totals(port: int) -> dict[str, float]:
    """sqsbalancerd_messages_total summed over queues, by outcome, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = defaultdict(float)
    pattern = re.compile(r"^sqsbalancerd_messages_total\{(.*)\} ([0-9.e+]+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            outcome = re.search(r'outcome="([^"]+)"', match.group(1))
            assert outcome is not None
            totals[outcome.group(1)] += float(match.group(2))
    return totals


@pytest.mark.timeout(120)
def test_rejected_receipt_handle_message_comes_back_and_is_not_lost(
    sqs, endpoint, daemons, proxies, fault_config, totals
):
    """Simulated: an expired receipt handle — DeleteMessageBatch reports some entries as
    ReceiptHandleIsInvalid (SenderFault true) and the proxy leaves them undeleted. Real:
    the message comes back after its visibility timeout and is handled again (a counted
    duplicate: at-least-once), never lost."""
    urls = make_queues(sqs, totals.sqs_queues)
    proxy = proxies.start("sqs")
    rejected = max(3, totals.sqs_messages // 40)
    rule = proxy.add(
        Rule(
            "sqs",
            "DeleteMessageBatch",
            FailEntries("ReceiptHandleIsInvalid", sender_fault=True, per_batch=1),
            times=rejected,
            period=3,
        )
    )
    feeder = Feeder(endpoint, urls, total=totals.sqs_messages, depth=totals.queue_depth)
    feeder.start()
    daemon = daemons.start(config=standalone(fault_config), env=proxy.env(("sqs",)))

    def handled_all(ids: list[str]) -> bool:
        # Every rejection injected, and each rejected message handled a second time.
        if rule.injected != rejected:
            return False
        events = read_events(daemons.events_path)
        ok = [e for e in events if e["event"] == "end" and e["outcome"] == "ok"]
        return set(ids) <= {e["id"] for e in ok} and len(ok) >= len(ids) + rejected

    sent = drain_fed(
        feeder, sqs, urls, totals, is_handled=handled_all, what="rejected messages handled again"
    )
    daemon.terminate()
    assert daemon.wait(timeout_s=30) == 0, daemon.log()

    log = daemon.log()
    events = read_events(daemons.events_path)
    tally = Tally(sent, events)
    summary = stop_summary(log)
    print(
        f"\nrejected receipt handles: {tally.figures()}; {rule.entries_failed} deletes rejected "
        f"(ReceiptHandleIsInvalid); daemon delete_failed={summary['delete_failed']}; each of "
        f"those messages came back after the {VISIBILITY_S}s visibility timeout and was "
        "handled again (the duplicates)"
    )
    assert not tally.lost and not tally.unknown
    assert tally.handled == tally.sent
    assert rule.entries_failed == rejected
    # Permanent for the daemon: not retried, counted, the message left to reappear.
    gave_up = {line["message_id"] for line in given_up(log)}
    assert summary["delete_failed"] == len(given_up(log))
    assert {line["error"] for line in given_up(log)} == {"ReceiptHandleIsInvalid"}
    assert set(rule.message_ids) <= gave_up
    # Any other give-up: moto rejecting the delete of a message handled twice (deletes late).
    assert gave_up - set(rule.message_ids) <= set(tally.duplicated)
    # Those came back (receive count 2) and were handled twice; any other duplicate is a
    # delete sent after the visibility timeout (counted; none in short mode).
    causes = explain_duplicates(proxy, tally.duplicated, log)
    print(f"duplicates by cause: { {k: len(v) for k, v in causes.items()} }")
    assert set(rule.message_ids) <= causes["delete given up"]
    # (Once more than that only if a later delete of it was late as well: long mode, rare.)
    assert all(tally.duplicated.get(m, 0) >= 1 for m in rule.message_ids)
    assert not causes["unexplained"], timeline(proxy, causes["unexplained"])
    again = {e["id"] for e in events if e["event"] == "start" and e["receive_count"] == 2}
    assert set(rule.message_ids) <= again


# -- AWS unreachable at start ----------------------------------------------------------


def fatal_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("sqsbalancerd: error:")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "case",
    [
        "closed port (both)",
        "closed port (SQS)",
        "dropped (DynamoDB)",
        "blackholed (SQS)",
        "throttled (SQS)",
    ],
)
def test_start_with_aws_unreachable_exits_1_with_one_clear_line(
    case, daemons, proxies, fault_config, sqs
):
    """Real: nothing listens on the port (connection refused). Simulated: the proxy drops
    every DynamoDB connection, holds every SQS connection unanswered, or throttles every SQS
    call. Bounded retries (botocore's attempts), then one line naming the service and what
    went wrong, exit 1, no traceback, well within 60 s. DynamoDB at start is retried for
    about 30 s first (START_RETRY_DELAYS_S), one warning per retry."""
    sqs.create_queue(QueueName="faults-0")
    closed = f"http://127.0.0.1:{free_port()}"
    proxy = proxies.start("start")
    mode, env, service = "dynamodb", {}, "DynamoDB"
    if case == "closed port (both)":  # discovery runs before the join: SQS is met first
        env = {"AWS_ENDPOINT_URL_SQS": closed, "AWS_ENDPOINT_URL_DYNAMODB": closed}
        service = "SQS"
    elif case == "closed port (SQS)":
        mode, env, service = "standalone", {"AWS_ENDPOINT_URL_SQS": closed}, "SQS"
    elif case == "dropped (DynamoDB)":
        proxy.add(Rule("dynamodb", None, Drop()))
        env = proxy.env()
    elif case == "blackholed (SQS)":  # connections accepted, never answered
        proxy.add(Rule("sqs", None, Blackhole(hold_s=60)))
        mode, env, service = "standalone", proxy.env(("sqs",)), "SQS"
    else:
        proxy.add(Rule("sqs", None, throttle("sqs")))
        mode, env, service = "standalone", proxy.env(("sqs",)), "SQS"
    started = time.monotonic()
    daemon = daemons.start(config=fault_config(mode=mode), env=env)
    code = daemon.wait(timeout_s=60)
    elapsed_s = time.monotonic() - started
    output = daemon.log()
    lines = fatal_lines(output)
    attempts = len(proxy.records())
    print(
        f"\nstart with {case}: exit {code} after {elapsed_s:.1f}s, {attempts} attempts seen "
        f"by the proxy; {lines}"
    )
    assert code == 1, output
    assert elapsed_s < 60
    assert len(lines) == 1, output
    how = "throttled" if case == "throttled (SQS)" else "unreachable"
    assert service in lines[0] and how in lines[0], lines[0]
    assert "Traceback" not in output, output
    if case == "dropped (DynamoDB)":  # dynamodb_options: max_attempts = 2, per start attempt
        starts = len(START_RETRY_DELAYS_S) + 1
        assert len(proxy.records("dynamodb")) == 2 * starts
        assert output.count("DynamoDB failed at start; retrying") == starts - 1
    elif case == "throttled (SQS)":
        assert attempts == 3  # discovery_options: 3 attempts
    elif case == "blackholed (SQS)":  # unanswered requests are not recorded: time them
        assert 3 * 10 <= elapsed_s < 45  # 3 attempts, 10 s read timeout each (was minutes)
    assert "unexpected" not in lines[0]
