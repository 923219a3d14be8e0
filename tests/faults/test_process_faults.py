"""Process faults: rolling restarts, SIGKILLs, SIGTERM at awkward moments, a duplicate id.

Every fault here is real: `sqsbalancerd run` subprocesses against the moto server, killed or
signalled for real. Every message id is counted: sent (the feeder's SendMessageBatch
answers) against handled (the `end` events tests/handlers.py records per process).
Short mode by default; SQSB_FAULTS_LONG=1 for the long totals.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from typing import Any

import pytest
from support import (
    Feeder,
    concurrent_handlings,
    json_log,
    ownership_rows,
    queue_depth,
    read_events,
    wait_until,
)
from totals import TOTALS

pytestmark = pytest.mark.faults

LONG = TOTALS.is_long
APPLICATION_KEY = "app#sqsbalancer"
INTERVAL_S, TIMEOUT_S, DELAY_S = 1.0, 4.0, 1.0

ROLLING_INSTANCES = TOTALS.rolling_instances
ROLLING_QUEUES = TOTALS.rolling_queues
ROLLING_TOTAL = TOTALS.rolling_messages
# Per queue: shallow enough that most messages are sent while the restarts go on.
ROLLING_DEPTH = max(2, ROLLING_TOTAL // ROLLING_QUEUES // 10)
CHAOS_QUEUES = 16
CHAOS_KILLS = TOTALS.kill_rounds
CHAOS_EVERY_S = TOTALS.kill_every_s


def cluster_config(
    instance_id: str,
    *,
    table: str,
    pattern: str,
    pool_size: int = 4,
    shutdown_s: float = 20,
    balance: str = "count",
) -> str:
    return f"""
instance_id = "{instance_id}"
handler = "handlers:record"
[coordination]
mode = "dynamodb"
table_name = "{table}"
heartbeat_interval = {INTERVAL_S}
heartbeat_timeout = {TIMEOUT_S}
rebalance_delay = {DELAY_S}
# Count-based unless a test says otherwise: these tests assert one owner per queue at a
# time, and load-aware balancing shares a saturated queue between replicas on purpose.
balance = "{balance}"
[discovery]
queue_pattern = "{pattern}"
interval = 1
[sqs]
wait_time_seconds = 1
[workers]
pool_size = {pool_size}
[shutdown]
timeout = {shutdown_s}
[retry]
base = 0
[observability]
http_port = 0
log_format = "json"
"""


def standalone_config(
    pattern: str, *, wait_s: int = 20, shutdown_s: float = 5, pool_size: int = 4, extra: str = ""
) -> str:
    return f"""
handler = "handlers:record"
coordination.mode = "standalone"
[discovery]
queue_pattern = "{pattern}"
[sqs]
wait_time_seconds = {wait_s}
[workers]
pool_size = {pool_size}
[shutdown]
timeout = {shutdown_s}
[observability]
http_port = 0
log_format = "json"
{extra}
"""


def make_queues(sqs: Any, names: list[str], *, visibility_s: int) -> dict[str, str]:
    attributes = {"VisibilityTimeout": str(visibility_s)}
    return {n: sqs.create_queue(QueueName=n, Attributes=attributes)["QueueUrl"] for n in names}


def owners(dynamodb: Any, table: str) -> dict[str, str | None]:
    """queue -> owner (None: released) from the ownership rows."""
    return {q: row.owner for q, row in ownership_rows(dynamodb, table).items()}


def all_owned_by(dynamodb: Any, table: str, queues: list[str], live: set[str]) -> bool:
    current = owners(dynamodb, table)
    return all(current.get(q) in live for q in queues)


def handled_ok(events: list[dict[str, Any]]) -> Counter[str]:
    return Counter(e["id"] for e in events if e["event"] == "end" and e.get("outcome") == "ok")


def json_lines(log: str) -> list[dict[str, Any]]:
    lines = []
    for line in log.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def summary_of(log: str) -> dict[str, Any]:
    return [line for line in json_lines(log) if line.get("msg", "").startswith("stopped")][-1]


def log_has(daemon: Any, message: str) -> bool:
    return any(line.get("msg") == message for line in json_lines(daemon.log()))


def stop_all(nodes: dict[str, Any], *, timeout_s: float = 60) -> dict[str, int]:
    running = {name: d for name, d in nodes.items() if d.proc.poll() is None}
    for daemon in running.values():
        daemon.terminate()
    return {name: daemon.wait(timeout_s=timeout_s) for name, daemon in running.items()}


def explain_duplicates(events: list[dict[str, Any]], ids: set[str]) -> list[str]:
    lines = []
    for message_id in sorted(ids)[:10]:
        history = [
            (e["event"], e["pid"], e["receive_count"], e.get("outcome"))
            for e in events
            if e["id"] == message_id
        ]
        lines.append(f"{message_id}: {history}")
    return lines


# -- rolling restart ------------------------------------------------------------------------


@pytest.mark.timeout(240)  # x8 in the long mode (tests/faults/conftest.py)
def test_rolling_restart_of_four_instances_loses_nothing(sqs, dynamodb, daemons, endpoint):
    """SIGTERM each of the instances in turn (exit 0), starting a replacement each time, while
    a feeder keeps the shallow queues supplied: most messages are sent during the restarts.
    Real faults: SIGTERM, process exit. Totals: tests/faults/totals.py."""
    table = "sqsb-rolling"
    names = [f"roll-{i:02d}" for i in range(ROLLING_QUEUES)]
    urls = make_queues(sqs, names, visibility_s=10)
    config = {"table": table, "pattern": "^roll-"}
    originals = [f"r{i}" for i in range(1, ROLLING_INSTANCES + 1)]
    nodes = {n: daemons.start(config=cluster_config(n, **config), name=n) for n in originals}
    live = set(nodes)
    wait_until(
        lambda: all_owned_by(dynamodb, table, names, live),
        timeout_s=60,
        every_s=0.2,
        what="every instance to own its share",
    )
    body = lambda n: json.dumps({"n": n, "sleep": 0.02})  # noqa: E731 - in flight at SIGTERM
    # Each step lets one more share of the messages out, so sending lasts past the last
    # restart however fast the instances handle (on a quiet box they handled the rest
    # during one takeover, and the feeder was done before the third SIGTERM).
    share = ROLLING_TOTAL // (ROLLING_INSTANCES + 2)
    feeder = Feeder(
        endpoint, urls, total=ROLLING_TOTAL, depth=ROLLING_DEPTH, body=body, limit=2 * share
    ).start()
    steps: list[str] = []
    sent_at_signal: list[int] = []
    started = time.monotonic()
    try:
        for step, old in enumerate(originals):
            threshold = (step + 1) * share
            wait_until(
                lambda t=threshold: len(handled_ok(read_events(daemons.events_path))) >= t,
                timeout_s=240 if LONG else 90,
                every_s=0.5,
                what=f"{threshold} messages handled before restarting {old}",
            )
            sent_at_signal.append(len(feeder.sent_ids()))
            signalled = time.monotonic()
            nodes[old].terminate()
            feeder.allow((step + 3) * share)
            assert nodes[old].wait(timeout_s=60) == 0, nodes[old].log()[-3000:]
            exited_s = time.monotonic() - signalled
            summary = summary_of(nodes[old].log())
            live.discard(old)
            new = f"{old}b"
            nodes[new] = daemons.start(config=cluster_config(new, **config), name=new)
            live.add(new)
            wait_until(
                lambda n=new: (
                    n in owners(dynamodb, table).values()
                    and all_owned_by(dynamodb, table, names, live)
                ),
                timeout_s=60,
                every_s=0.2,
                what=f"{new} to take its share",
            )
            steps.append(
                f"{old}: exit 0 after {exited_s:.1f}s (drain {summary['drain_s']}s, "
                f"deleted {summary['deleted']}, released {summary['released']}); "
                f"{new} owning its share {time.monotonic() - signalled:.1f}s after"
            )
        feeder.allow(ROLLING_TOTAL)
        wait_until(
            feeder.is_finished,
            timeout_s=600 if LONG else 120,
            every_s=0.5,
            what="the feeder to send everything",
        )
        assert feeder.error is None, feeder.error
        sent = feeder.sent_ids()
        wait_until(
            lambda: set(sent) <= set(handled_ok(read_events(daemons.events_path))),
            timeout_s=600 if LONG else 120,
            every_s=1.0,
            what="every message handled",
        )
    finally:
        feeder.stop()
    assert set(stop_all(nodes).values()) == {0}
    elapsed = time.monotonic() - started

    events = read_events(daemons.events_path)
    ok = handled_ok(events)
    lost = set(sent) - set(ok)
    duplicated = {i for i, n in ok.items() if n > 1}
    checked, overlaps = concurrent_handlings(events, {})
    print(
        f"\nrolling restart: {len(sent)} sent, {len(set(ok) & set(sent))} handled, "
        f"{len(lost)} lost, {len(duplicated)} duplicated, {elapsed:.1f}s"
    )
    print("\n".join(steps))
    print(f"sent when each SIGTERM went out: {sent_at_signal} of {ROLLING_TOTAL}")
    # Fed during the restarts, not all queued up before the first one.
    assert sent_at_signal == sorted(set(sent_at_signal)), sent_at_signal
    assert sent_at_signal[-1] < ROLLING_TOTAL
    assert not lost
    assert not set(ok) - set(sent)
    # SIGTERM drains: running handlers finish and their deletes are flushed before the rows are
    # released, and unstarted messages go back unhandled; so nothing is handled twice.
    assert not duplicated, explain_duplicates(events, duplicated)
    assert not overlaps, overlaps[:5]
    assert checked >= len(sent)
    for url in urls.values():
        assert queue_depth(sqs, url) == (0, 0)


# -- SIGKILL chaos --------------------------------------------------------------------------


def shared_queues(logs: list[str]) -> set[str]:
    """Queues some plan gave several owners (replicas), from the planner's move log lines."""
    return {
        line["queue"]
        for log in logs
        for line in json_log(log)
        if line["msg"] == "planner moves a queue" and max(len(line["from"]), len(line["to"])) > 1
    }


@pytest.mark.timeout(180)
@pytest.mark.parametrize("balance", ["count", "load"])
def test_sigkill_every_few_seconds_loses_nothing_and_never_shares_a_queue(
    sqs, dynamodb, daemons, endpoint, balance
):
    """SIGKILL the oldest instance every few seconds under load, starting a replacement each
    time. Real faults: SIGKILL mid-handler, member rows left behind, messages in flight.
    Load-aware, a queue may be shared on purpose (replicas, each fenced by its own row):
    only queues no plan ever shared must have one process handling them at a time."""
    table = "sqsb-chaos"
    names = [f"chaos-{i:02d}" for i in range(CHAOS_QUEUES)]
    urls = make_queues(sqs, names, visibility_s=4)
    config = {"table": table, "pattern": "^chaos-", "balance": balance}
    nodes = {
        n: daemons.start(config=cluster_config(n, **config), name=n) for n in ("k1", "k2", "k3")
    }
    wait_until(
        lambda: all_owned_by(dynamodb, table, names, set(nodes)),
        timeout_s=60,
        every_s=0.2,
        what="three instances to own every queue",
    )
    body = lambda n: json.dumps({"n": n, "sleep": 0.05})  # noqa: E731
    # Load for as long as the kills last: the feeder stops sending after the last one.
    feeder = Feeder(endpoint, urls, total=100_000, depth=30, body=body).start()
    killed_at: dict[int, float] = {}
    order = ["k1", "k2", "k3"]
    started = time.monotonic()
    try:
        for kill in range(CHAOS_KILLS):
            victim = order.pop(0)
            pid = nodes[victim].proc.pid
            due = time.monotonic() + CHAOS_EVERY_S
            # Kill only while the victim is in the middle of handling (a start without an end).
            wait_until(
                lambda p=pid, d=due: time.monotonic() >= d and is_busy(daemons, p),
                timeout_s=60,
                every_s=0.1,
                what=f"{victim} busy",
            )
            nodes[victim].proc.send_signal(signal.SIGKILL)
            killed_at[pid] = time.time()
            nodes[victim].wait(timeout_s=10)
            new = f"k{4 + kill}"
            nodes[new] = daemons.start(config=cluster_config(new, **config), name=new)
            order.append(new)
        wait_until(
            lambda: all_owned_by(dynamodb, table, names, set(order)),
            timeout_s=60,
            every_s=0.2,
            what="the last replacement to take its share",
        )
        feeder.stop()
        assert feeder.error is None, feeder.error
        sent = feeder.sent_ids()
        wait_until(
            lambda: set(sent) <= set(handled_ok(read_events(daemons.events_path))),
            timeout_s=90,
            every_s=1.0,
            what="every message handled",
        )
    finally:
        feeder.stop()
    codes = stop_all({n: d for n, d in nodes.items() if d.proc.pid not in killed_at})
    assert set(codes.values()) == {0}, codes
    elapsed = time.monotonic() - started

    events = read_events(daemons.events_path)
    ok = handled_ok(events)
    lost = set(sent) - set(ok)
    starts = Counter(e["id"] for e in events if e["event"] == "start")
    repeated = {i for i, n in starts.items() if n > 1}
    duplicated = {i for i, n in ok.items() if n > 1}
    on_killed = {e["id"] for e in events if e["pid"] in killed_at}
    cut = on_killed - {e["id"] for e in events if e["pid"] in killed_at and e["event"] == "end"}
    shared = shared_queues([node.log() for node in nodes.values()])
    exclusive = [e for e in events if e["queue"] not in shared]
    checked, overlaps = concurrent_handlings(exclusive, killed_at)
    print(
        f"\nSIGKILL chaos ({balance}, {len(shared)} queues shared): {CHAOS_KILLS} kills in "
        f"{elapsed:.1f}s; {len(sent)} sent, "
        f"{len(set(ok) & set(sent))} handled, {len(lost)} lost; {len(duplicated)} handled ok "
        f"twice + {len(repeated - duplicated)} restarted after a cut; all {len(repeated)} "
        f"repeats first seen by a killed instance ({len(cut)} cut mid-handler, "
        f"{len(repeated - cut)} finished but not yet deleted); {checked} handlings checked "
        f"for overlap"
    )
    assert not lost
    assert not set(ok) - set(sent)
    # Only what a killed instance had started can be handled again: it was cut mid-handler,
    # or its delete was still lingering (batched) when the process died.
    assert repeated <= on_killed, explain_duplicates(events, repeated - on_killed)
    assert not overlaps, overlaps[:5]


def is_busy(daemons: Any, pid: int) -> bool:
    events = [e for e in read_events(daemons.events_path) if e["pid"] == pid]
    open_ids = Counter()
    for event in events:
        open_ids[event["id"]] += 1 if event["event"] == "start" else -1
    return any(n > 0 for n in open_ids.values())


# -- SIGTERM at awkward moments -------------------------------------------------------------


@pytest.mark.timeout(120)
def test_sigterm_during_a_20s_long_poll_and_a_second_sigterm(sqs, daemons):
    """Three daemons side by side, each long-polling its own empty queue for 20 s:
    idle: SIGTERM → the poll in flight is awaited, exit 0 within wait + margin;
    arrival: SIGTERM, then a message arrives → the poll returns it, it is released (visible
    again at once, not after the 30 s visibility timeout), exit 0 promptly;
    twice: SIGTERM, then SIGTERM again → exit 1 at once. Real faults: signals."""
    urls = make_queues(sqs, ["lp-idle", "lp-arrival", "lp-twice"], visibility_s=30)
    nodes = {
        name: daemons.start(config=standalone_config(f"^lp-{name}$"), name=name)
        for name in ("idle", "arrival", "twice")
    }
    for daemon in nodes.values():
        wait_until(
            lambda d=daemon: log_has(d, "consuming queue"),
            timeout_s=30,
            what="the daemon to start polling",
        )
    signalled = {}
    for name, daemon in nodes.items():
        daemon.terminate()
        signalled[name] = time.monotonic()
    for daemon in nodes.values():
        wait_until(
            lambda d=daemon: log_has(d, "stop requested; draining"),
            timeout_s=10,
            what="the first SIGTERM to be seen",
        )
    sent_id = sqs.send_message(QueueUrl=urls["lp-arrival"], MessageBody="late")["MessageId"]
    second_at = time.monotonic()
    nodes["twice"].terminate()

    assert nodes["twice"].wait(timeout_s=10) == 1, nodes["twice"].log()
    forced_s = time.monotonic() - second_at
    assert nodes["arrival"].wait(timeout_s=30) == 0, nodes["arrival"].log()
    arrival_s = time.monotonic() - signalled["arrival"]
    assert nodes["idle"].wait(timeout_s=60) == 0, nodes["idle"].log()
    idle_s = time.monotonic() - signalled["idle"]

    idle_drain = summary_of(nodes["idle"].log())["drain_s"]
    arrival = summary_of(nodes["arrival"].log())
    forced = summary_of(nodes["twice"].log())
    print(
        f"\nSIGTERM during a 20 s poll: idle exit 0 after {idle_s:.1f}s (drain {idle_drain}s);"
        f" message arriving after SIGTERM: released, exit 0 after {arrival_s:.1f}s; second "
        f"SIGTERM: exit 1 {forced_s:.2f}s after it"
    )
    # Bound: the poll in flight (20 s) + POLL_END_MARGIN_S (5 s) + shutdown.timeout (5 s).
    assert idle_s <= 20 + 5 + 5 + 5
    assert idle_drain >= 10, "the poll in flight was not awaited"
    assert arrival["received"] == 1 and arrival["succeeded"] == 0
    assert arrival_s <= 10
    assert queue_depth(sqs, urls["lp-arrival"]) == (1, 0)  # released, not left invisible
    assert not [e for e in read_events(daemons.events_path) if e["id"] == sent_id]
    assert forced["forced"] is True and forced["exit_code"] == 1
    assert forced_s <= 5


@pytest.mark.timeout(120)
def test_sigterm_while_handlers_outlast_the_shutdown_timeout(sqs, daemons):
    """Handlers sleep 10 s. "deadline": shutdown.timeout 2 s, one SIGTERM; "forced":
    shutdown.timeout 30 s, a second SIGTERM while the handlers run. Both exit 1 without waiting
    for the handlers; the abandoned messages are not deleted and reappear after their 4 s
    visibility timeout. Real faults: signals, exit."""
    urls = make_queues(sqs, ["slow-deadline", "slow-forced"], visibility_s=4)
    ids = {
        name: {
            sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"sleep": 10}))["MessageId"]
            for _ in range(2)
        }
        for name, url in urls.items()
    }
    nodes = {
        "deadline": daemons.start(
            config=standalone_config("^slow-deadline$", wait_s=1, shutdown_s=2, pool_size=2),
            name="deadline",
        ),
        "forced": daemons.start(
            config=standalone_config("^slow-forced$", wait_s=1, shutdown_s=30, pool_size=2),
            name="forced",
        ),
    }
    every_id = ids["slow-deadline"] | ids["slow-forced"]
    wait_until(
        lambda: (
            {e["id"] for e in read_events(daemons.events_path) if e["event"] == "start"} == every_id
        ),
        timeout_s=30,
        what="all four handlers running",
    )
    signalled = time.monotonic()
    for daemon in nodes.values():
        daemon.terminate()
    wait_until(
        lambda: log_has(nodes["forced"], "stop requested; draining"),
        timeout_s=10,
        what="the first SIGTERM to be seen",
    )
    second_at = time.monotonic()
    nodes["forced"].terminate()
    assert nodes["forced"].wait(timeout_s=30) == 1, nodes["forced"].log()
    forced_s = time.monotonic() - second_at
    assert nodes["deadline"].wait(timeout_s=30) == 1, nodes["deadline"].log()
    deadline_s = time.monotonic() - signalled
    for name, daemon in nodes.items():
        summary = summary_of(daemon.log())
        assert summary["abandoned"] == 2 and summary["deleted"] == 0, (name, summary)
    assert summary_of(nodes["forced"].log())["forced"] is True
    for url in urls.values():
        wait_until(
            lambda u=url: queue_depth(sqs, u) == (2, 0),
            timeout_s=20,
            every_s=0.1,
            what="the abandoned messages to reappear",
        )
    reappeared_s = time.monotonic() - signalled
    # The handlers never returned in a live process: no `end` event at all.
    assert not [e for e in read_events(daemons.events_path) if e["event"] == "end"]
    for name, url in urls.items():
        received = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        messages = received.get("Messages", [])
        assert {m["MessageId"] for m in messages} == ids[name]
        assert {m["Attributes"]["ApproximateReceiveCount"] for m in messages} == {"2"}
    print(
        f"\nhandlers past shutdown.timeout=2s: exit 1 after {deadline_s:.1f}s; second SIGTERM "
        f"with handlers running: exit 1 {forced_s:.1f}s after it; 4 abandoned, 0 deleted, "
        f"all visible again {reappeared_s:.1f}s after SIGTERM (receive count 2)"
    )
    # Before the fix (Engine.stop joined busy workers for 10 s) these were 10+ s.
    assert deadline_s <= 2 + 5
    assert forced_s <= 4


# -- identity -------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_second_instance_with_the_same_id_exits_2_and_the_first_keeps_it(sqs, dynamodb, daemons):
    """Real fault: two processes configured with one instance_id."""
    table = "sqsb-dupid"
    url = make_queues(sqs, ["dup-a"], visibility_s=10)["dup-a"]
    config = cluster_config("same-id", table=table, pattern="^dup-")
    first = daemons.start(config=config, name="first")
    wait_until(lambda: log_has(first, "joined the cluster"), timeout_s=30, what="first joined")
    before = member_row(dynamodb, table, "same-id")
    started = time.monotonic()
    second = daemons.start(config=config, name="second")
    assert second.wait(timeout_s=TIMEOUT_S + 30) == 2, second.log()
    refused_s = time.monotonic() - started
    log = second.log()
    errors = [line for line in log.splitlines() if line.startswith("sqsbalancerd: error:")]
    assert len(errors) == 1, log
    assert 'instance_id "same-id" is in use by a live instance' in errors[0]
    assert "Traceback" not in log
    assert not [line for line in json_lines(log) if line.get("msg") == "joined the cluster"]

    after = member_row(dynamodb, table, "same-id")
    assert after["epoch"] == before["epoch"]  # the first one's registration, untouched
    wait_until(
        lambda: member_row(dynamodb, table, "same-id")["counter"] > after["counter"],
        timeout_s=10,
        what="the first instance to keep heartbeating",
    )
    message_id = sqs.send_message(QueueUrl=url, MessageBody="{}")["MessageId"]
    wait_until(
        lambda: handled_ok(read_events(daemons.events_path))[message_id] == 1,
        timeout_s=30,
        what="the first instance to keep consuming",
    )
    assert {e["pid"] for e in read_events(daemons.events_path)} == {first.proc.pid}
    first.terminate()
    assert first.wait(timeout_s=30) == 0, first.log()
    print(
        f"\nduplicate instance_id refused after {refused_s:.1f}s (exit 2: {errors[0]!r}); "
        "the first kept its row and exited 0"
    )


def member_row(dynamodb: Any, table: str, instance_id: str) -> dict[str, Any]:
    item = dynamodb.get_item(
        TableName=table,
        Key={"pk": {"S": APPLICATION_KEY}, "sk": {"S": f"member#{instance_id}"}},
        ConsistentRead=True,
    )["Item"]
    return {"epoch": item["epoch"]["S"], "counter": int(item["counter"]["N"])}


# -- clock offset ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_clock_offset_between_instances_does_not_change_who_is_alive(dynamodb):
    """Three instances whose wall clocks are hours apart (and whose monotonic clocks have
    different origins) heartbeat through one table on the moto server; each judges liveness
    with its own LivenessTracker. Simulated: the clocks (FakeClock); real: the table."""
    from support import FakeClock

    from sqsbalancerd.coordination.membership import LivenessTracker, Membership
    from sqsbalancerd.coordination.table import CoordinationTable

    hour = 3600.0
    clocks = {
        "a": FakeClock(start_s=1_000.0, wall_s=1_700_000_000.0),
        "b": FakeClock(start_s=52.0, wall_s=1_700_000_000.0 + 5 * hour),  # 5 h ahead
        "c": FakeClock(start_s=987_654.0, wall_s=1_700_000_000.0 - 3 * hour),  # 3 h behind
    }
    tables = {
        name: CoordinationTable(
            dynamodb, table_name="sqsb-skew", application="sqsbalancer", clock=clock
        )
        for name, clock in clocks.items()
    }
    tables["a"].ensure(create=True, region="us-east-1")
    members = {
        name: Membership(
            tables[name],
            instance_id=name,
            clock=clock,
            heartbeat_interval_s=INTERVAL_S,
            heartbeat_timeout_s=TIMEOUT_S,
        )
        for name, clock in clocks.items()
    }
    trackers = {name: LivenessTracker(clock, timeout_s=TIMEOUT_S) for name, clock in clocks.items()}
    for membership in members.values():
        membership.join(lambda _s: False)
    stops_at = 3  # b stops heartbeating after this step (as if paused or partitioned)
    verdicts: list[dict[str, tuple[bool, bool]]] = []
    for step in range(12):
        for name, clock in clocks.items():
            clock.advance(INTERVAL_S)
            if name != "b" or step < stops_at:
                members[name].heartbeat()
        views = {}
        for name, tracker in trackers.items():
            tracker.observe(tables[name].members())
            views[name] = {m: (tracker.is_alive(m), tracker.is_dead(m)) for m in clocks}
        assert views["a"] == views["b"] == views["c"], (step, views)
        verdicts.append(views["a"])
    b_alive = [v["b"][0] for v in verdicts]
    b_dead = [v["b"][1] for v in verdicts]
    assert b_alive == [True] * (stops_at + 3) + [False] * (12 - stops_at - 3)
    assert b_dead.index(True) == stops_at + 3
    assert all(v["a"] == (True, False) and v["c"] == (True, False) for v in verdicts)
    recorded = {r.instance_id: r.heartbeat_at for r in tables["a"].members()}
    assert recorded["b"] - recorded["a"] > 4.9 * hour and recorded["a"] - recorded["c"] > 2.9 * hour
    print(
        f"\nclock offset (+5 h, -3 h): identical liveness verdicts from all three observers at "
        f"all 12 steps; b judged dead {b_dead.index(True) - (stops_at - 1)} intervals "
        f"({TIMEOUT_S:g} s) after its last heartbeat, by everyone at the same step"
    )
