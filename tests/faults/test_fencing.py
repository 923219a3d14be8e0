"""DynamoDB lost under a running cluster: self-fencing, takeover, recovery; the table deleted.

Two `sqsbalancerd run` processes (n1, n2) share the queues through DynamoDB, each reaching
SQS and DynamoDB through its own fault proxy, so every ReceiveMessage and every heartbeat
of each instance is recorded with its wall-clock start and end (same host, same clock as
the handler events and the JSON log lines).
Real (moto): queues, messages, the coordination table and its conditional writes, the
table's deletion. Simulated (proxy): n1's DynamoDB unreachable (requests blackholed: its
calls time out) or throttled (400 ProvisionedThroughputExceededException), while its SQS
keeps working.
Timings: heartbeat 1 s, timeout 4 s, fence_margin 1 s (default: the interval), rebalance
delay 1 s, 1 s long polls; the resume test widens the timeout (10 s) and margin (5 s) so the
outage can end between the fence and the moment n2 could judge n1 dead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from proxy import Blackhole, FaultProxy, Record, Rule, throttle
from support import (
    Feeder,
    Tally,
    concurrent_handlings,
    drain_queues,
    is_fixed_point,
    json_log,
    ownership_rows,
    read_events,
    wait_until,
)

pytestmark = pytest.mark.faults

TABLE = "sqsb-faults"
APPLICATION_KEY = "app#sqsbalancer"
VISIBILITY_S = 5


def make_queues(sqs: Any, count: int) -> dict[str, str]:
    return {
        f"faults-{n:02d}": sqs.create_queue(
            QueueName=f"faults-{n:02d}", Attributes={"VisibilityTimeout": str(VISIBILITY_S)}
        )["QueueUrl"]
        for n in range(count)
    }


def ownership(dynamodb: Any) -> dict[str, tuple[str | None, int]]:
    """queue -> (owner, lease), read from the table directly."""
    return {q: (row.owner, row.lease) for q, row in ownership_rows(dynamodb, TABLE).items()}


def owners(dynamodb: Any) -> dict[str, str | None]:
    return {queue: owner for queue, (owner, _) in ownership(dynamodb).items()}


def log_line(daemon: Any, text: str) -> dict[str, Any] | None:
    return next((line for line in json_log(daemon.log()) if text in line["msg"]), None)


def handled_by(path: Any, pid: int, queues: set[str]) -> int:
    return sum(
        1
        for e in read_events(path)
        if e["event"] == "end" and e["pid"] == pid and e["queue"] in queues
    )


def handled_ok(path: Any) -> set[str]:
    return {e["id"] for e in read_events(path) if e["event"] == "end" and e["outcome"] == "ok"}


def last_renewal(proxy: FaultProxy, instance_id: str, before: float = float("inf")) -> float:
    """Start of the instance's last heartbeat that got through (as the proxy saw it)."""
    renewals = [
        r.started
        for r in proxy.records("dynamodb", "UpdateItem")
        if r.key == f"member#{instance_id}" and r.status == 200 and r.started < before
    ]
    return max(renewals)


def member_epoch(dynamodb: Any, instance_id: str) -> str | None:
    """The incarnation of `instance_id` registered in the table (None: no row)."""
    item = dynamodb.get_item(
        TableName=TABLE,
        Key={"pk": {"S": APPLICATION_KEY}, "sk": {"S": f"member#{instance_id}"}},
        ConsistentRead=True,
    ).get("Item")
    return item["epoch"]["S"] if item else None


def receives(proxy: FaultProxy, queues: set[str]) -> list[Record]:
    return [r for r in proxy.records("sqs", "ReceiveMessage") if r.queue in queues]


# The settled state checked is the count ring's fixed point (support.is_fixed_point).
COUNT_RING = "count"


class Cluster:
    """n1 and n2, each behind its own proxy, consuming `faults-*` queues fed by a Feeder."""

    def __init__(
        self,
        sqs: Any,
        dynamodb: Any,
        endpoint: str,
        daemons: Any,
        proxies: Any,
        config: Callable[..., str],
        totals: Any,
        **timings: Any,
    ) -> None:
        self.sqs, self.dynamodb, self.daemons = sqs, dynamodb, daemons
        self.urls = make_queues(sqs, totals.cluster_queues)
        self.proxy = {name: proxies.start(name) for name in ("n1", "n2")}
        self.node = {
            name: daemons.start(
                config=config(instance_id=name, table=TABLE, balance=COUNT_RING, **timings),
                env=self.proxy[name].env(),
                name=name,
            )
            for name in ("n1", "n2")
        }
        self.pid = {name: daemon.proc.pid for name, daemon in self.node.items()}
        # Rows naming both are not enough: an instance that wrote its rows may still be
        # following its handoff, and faults injected then test the start, not the takeover.
        wait_until(
            lambda: (
                set(owners(dynamodb)) == set(self.urls)
                and set(owners(dynamodb).values()) == {"n1", "n2"}
                and all('"handoff complete"' in d.log() for d in self.node.values())
            ),
            timeout_s=30,
            every_s=0.1,
            what="n1 and n2 to share the queues, each having completed its handoff",
        )
        self.n1_queues = {q for q, owner in owners(dynamodb).items() if owner == "n1"}
        body = lambda n: json.dumps({"n": n, "sleep": 0.3})  # noqa: E731
        self.feeder = Feeder(
            endpoint, self.urls, total=totals.cluster_messages, depth=10, body=body
        )
        self.feeder.start()
        self.scale = totals.timeout_scale
        # n1 is busy on its queues when its DynamoDB goes.
        wait_until(
            lambda: handled_by(daemons.events_path, self.pid["n1"], self.n1_queues) >= 3,
            timeout_s=30,
            what="n1 handling its queues",
        )

    def finish_feeding(self) -> dict[str, str]:
        timeout_s = 90.0 * self.scale
        wait_until(self.feeder.is_finished, timeout_s=timeout_s, every_s=0.2, what="all sent")
        assert self.feeder.error is None, self.feeder.error
        sent = self.feeder.sent_ids()
        wait_until(
            lambda: set(sent) <= handled_ok(self.daemons.events_path),
            timeout_s=timeout_s,
            every_s=0.2,
            what="every message handled",
        )
        return sent


FAULTS = {"unreachable": lambda: Blackhole(hold_s=60), "throttled": lambda: throttle("dynamodb")}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_instance_losing_dynamodb_fences_before_its_queues_are_taken(
    kind, sqs, dynamodb, endpoint, daemons, proxies, fault_config, totals
):
    """n1 loses DynamoDB for longer than heartbeat_timeout while SQS works: it stops
    receiving before its last renewal + timeout - margin; n2 judges it dead and takes its
    queues only after that; no queue is handled by both at once; nothing is lost. When
    DynamoDB returns, n1 finds its member row removed (n2 judged it dead): it says so in one
    warning line and rejoins as a new incarnation of its id, and owns queues again — a healed
    partition never ends the process."""
    timeout_s, margin_s = 4.0, 1.0
    cluster = Cluster(sqs, dynamodb, endpoint, daemons, proxies, fault_config, totals)
    n1, n2 = cluster.node["n1"], cluster.node["n2"]
    p1, p2 = cluster.proxy["n1"], cluster.proxy["n2"]
    mine = cluster.n1_queues
    epoch = member_epoch(dynamodb, "n1")
    try:
        cut = time.time()
        p1.add(Rule("dynamodb", None, FAULTS[kind]()))
        fenced = wait_until(lambda: log_line(n1, "self-fenced"), timeout_s=20, what="n1 fenced")
        wait_until(
            lambda: set(owners(dynamodb).values()) == {"n2"},
            timeout_s=30,
            every_s=0.05,
            what="n2 to own every queue",
        )
        owned_all = time.time()
        # The outage goes on while n2 consumes n1's former queues.
        wait_until(
            lambda: (
                handled_by(daemons.events_path, cluster.pid["n2"], mine) >= totals.outage_handled
            ),
            timeout_s=60,
            what="n2 handling n1's former queues",
        )
        restored = time.time()
        p1.clear("dynamodb")
        wait_until(lambda: log_line(n1, "rejoining"), timeout_s=30, what="n1 to rejoin")
        wait_until(
            lambda: "n1" in set(owners(dynamodb).values()),
            timeout_s=60,
            every_s=0.1,
            what="n1 owning queues again",
        )
        exited = time.time()  # owning again
        # The same process, a new incarnation, and a cluster that settles with it.
        assert n1.proc.poll() is None and n2.proc.poll() is None
        assert member_epoch(dynamodb, "n1") not in (None, epoch)
        wait_until(
            lambda: is_fixed_point(owners(dynamodb), cluster.urls, ["n1", "n2"]),
            timeout_s=60,
            every_s=0.2,
            what="the queues settled over n1 and n2",
        )
        sent = cluster.finish_feeding()
    finally:
        cluster.feeder.stop()
    for daemon in (n1, n2):
        daemon.terminate()
    assert n1.wait(timeout_s=30) == 0, n1.log()
    assert n2.wait(timeout_s=30) == 0, n2.log()

    # Before DynamoDB came back: afterwards n1 rejoins, renews and receives again.
    renewal = last_renewal(p1, "n1", before=restored)
    deadline = renewal + timeout_s - margin_s
    n1_receives = [r for r in receives(p1, mine) if r.started < restored]
    n2_first = {q: min(r.started for r in receives(p2, {q})) for q in mine}
    takeover = min(n2_first.values())
    events = read_events(daemons.events_path)
    tally = Tally(sent, events)
    checked, overlaps = concurrent_handlings(events, {})
    n1_log = n1.log()
    print(
        f"\nDynamoDB {kind} for n1 (SQS fine): {tally.figures()}\n"
        f"  last renewal {renewal - cut:+.2f}s from the cut; n1's last receive started "
        f"{max(r.started for r in n1_receives) - cut:+.2f}s, ended "
        f"{max(r.ended for r in n1_receives) - cut:+.2f}s (deadline {deadline - cut:+.2f}s)\n"
        f"  fencing time (cut → 'self-fenced'): {fenced['t'] - cut:.2f}s "
        f"({fenced['t'] - renewal:.2f}s after the last renewal; bound "
        f"{timeout_s - margin_s:g}s)\n"
        f"  takeover time (cut → n2's first receive on n1's queues): {takeover - cut:.2f}s "
        f"({'after' if takeover > fenced['t'] else 'BEFORE'} the fence line, "
        f"{takeover - renewal:.2f}s after the last renewal); n2 owned every queue "
        f"{owned_all - cut:.2f}s after the cut\n"
        f"  DynamoDB back after {restored - cut:.1f}s: n1 rejoined and owned queues again "
        f"{exited - restored:.1f}s later; {checked} handlings checked for overlap"
    )
    # n1 stopped receiving before the deadline: no receive started after it, none outlived it.
    assert all(r.started < deadline and r.ended <= deadline for r in n1_receives)
    # n2 received from n1's queues only after n1's deadline, after n1's last receive there
    # ended, and no earlier than n1's last renewal + heartbeat_timeout (its dead judgement).
    for queue, first in n2_first.items():
        n1_last_end = max(
            (r.ended for r in receives(p1, {queue}) if r.started < restored), default=0.0
        )
        assert first > deadline and first > n1_last_end, (queue, first - deadline)
        assert first >= renewal + timeout_s, (queue, first - renewal)
    # The pause (and its line) comes when the coordinator next looks: at most one DynamoDB
    # call late (here 2 attempts x 0.5 s timeout + <= 1 s backoff); receiving had already
    # stopped through the receive budget (asserted above).
    assert deadline - 0.5 <= fenced["t"] <= deadline + 2.5
    assert not overlaps, overlaps
    # Nothing lost; duplicates would be messages n1 received but never deleted (none).
    assert not tally.lost and not tally.unknown and tally.handled == tally.sent
    assert not tally.duplicated, tally.duplicated
    # Recovery: one warning line, no error, no traceback, the process went on.
    rejoins = [line for line in n1_log.splitlines() if "rejoining" in line]
    assert len(rejoins) == 1, rejoins
    assert not [line for line in n1_log.splitlines() if line.startswith("sqsbalancerd: error:")]
    assert "Traceback" not in n1_log


@pytest.mark.timeout(150)
def test_instance_fenced_by_throttling_resumes_when_dynamodb_returns_in_time(
    sqs, dynamodb, endpoint, daemons, proxies, fault_config, totals
):
    """Simulated: n1's DynamoDB throttled until n1 has fenced itself, then back — before
    n2 could judge n1 dead (timeout 10 s, margin 5 s). n1 stops receiving by its deadline,
    renews, checks its ownership rows are still its own and resumes the same queues; n2
    never receives from them; ownership rows (owner, lease) unchanged; nothing lost."""
    timeout_s, margin_s = 10.0, 5.0
    timings = {"heartbeat_timeout_s": timeout_s, "fence_margin_s": margin_s}
    cluster = Cluster(sqs, dynamodb, endpoint, daemons, proxies, fault_config, totals, **timings)
    n1, n2 = cluster.node["n1"], cluster.node["n2"]
    p1, p2 = cluster.proxy["n1"], cluster.proxy["n2"]
    mine = cluster.n1_queues
    before = ownership(dynamodb)
    try:
        cut = time.time()
        p1.add(Rule("dynamodb", None, throttle("dynamodb")))
        fenced = wait_until(lambda: log_line(n1, "self-fenced"), timeout_s=20, what="n1 fenced")
        restored = time.time()
        p1.clear("dynamodb")
        resumed = wait_until(
            lambda: log_line(n1, "receiving again"), timeout_s=10, what="n1 resumed"
        )
        after = ownership(dynamodb)
        sent = cluster.finish_feeding()
    finally:
        cluster.feeder.stop()
    for daemon in (n1, n2):
        daemon.terminate()
    assert n1.wait(timeout_s=30) == 0, n1.log()
    assert n2.wait(timeout_s=30) == 0, n2.log()

    heartbeats = [
        r.started
        for r in p1.records("dynamodb", "UpdateItem")
        if r.key == "member#n1" and r.status == 200
    ]
    renewal = max(t for t in heartbeats if t < restored)
    renewed_again = min(t for t in heartbeats if t >= restored)  # the budget starts afresh
    deadline = renewal + timeout_s - margin_s
    n1_receives = receives(p1, mine)
    during = [r for r in n1_receives if r.started < renewed_again]
    later = [r for r in n1_receives if r.started >= resumed["t"]]
    events = read_events(daemons.events_path)
    tally = Tally(sent, events)
    checked, overlaps = concurrent_handlings(events, {})
    print(
        f"\nDynamoDB throttled for n1 until it fenced: {tally.figures()}\n"
        f"  fencing time (cut → 'self-fenced'): {fenced['t'] - cut:.2f}s "
        f"({fenced['t'] - renewal:.2f}s after the last renewal; bound "
        f"{timeout_s - margin_s:g}s); last receive before it ended "
        f"{max(r.ended for r in during) - deadline:+.2f}s from the deadline\n"
        f"  DynamoDB back {restored - cut:.2f}s after the cut; receiving again "
        f"{resumed['t'] - restored:.2f}s later (fenced for {resumed['t'] - fenced['t']:.2f}s, "
        f"{resumed['t'] - renewal:.2f}s after the last renewal; others judge dead at "
        f"{timeout_s:g}s); {len(later)} receives after; {checked} handlings checked"
    )
    assert all(r.started < deadline and r.ended <= deadline for r in during)
    assert deadline - 0.5 <= fenced["t"] <= deadline + 2.5
    assert later, "n1 never received again"
    assert after == before  # same owners, same leases: nobody took anything over
    assert not receives(p2, mine), "n2 received from n1's queues"
    assert log_line(n2, "took over") is None and log_line(n2, "removed a dead") is None
    assert not overlaps, overlaps
    assert not tally.lost and not tally.unknown and tally.handled == tally.sent
    assert not tally.duplicated, tally.duplicated


@pytest.mark.timeout(120)
def test_table_deleted_under_a_running_cluster_exits_1_once_and_loses_nothing(
    sqs, dynamodb, endpoint, daemons, proxies, fault_config, totals
):
    """Real: the coordination table is deleted (moto) under n1 and n2 while they consume.
    Each says so in one line, drains (handlers finish, unstarted messages released) and
    exits 1 — once: nothing restarts inside the process, nothing recreates the table.
    Every message is either handled or still in SQS (counted); none lost."""
    cluster = Cluster(sqs, dynamodb, endpoint, daemons, proxies, fault_config, totals)
    try:
        deleted = time.time()
        dynamodb.delete_table(TableName=TABLE)
        codes = {name: daemon.wait(timeout_s=40) for name, daemon in cluster.node.items()}
        exited = time.time()
    finally:
        cluster.feeder.stop()
    sent = cluster.feeder.sent_ids()
    left = drain_queues(sqs, cluster.urls.values())
    events = read_events(daemons.events_path)
    tally = Tally(sent, events, left=left)
    handled_and_left = left & handled_ok(daemons.events_path)
    logs = {name: daemon.log() for name, daemon in cluster.node.items()}
    print(
        f"\ntable deleted under 2 instances: both exit {set(codes.values())} within "
        f"{exited - deleted:.1f}s; {tally.figures()} ({len(handled_and_left)} handled but "
        "left undeleted)"
    )
    assert codes == {"n1": 1, "n2": 1}, logs
    for log in logs.values():
        errors = [line for line in log.splitlines() if line.startswith("sqsbalancerd: error:")]
        assert len(errors) == 1 and f'"{TABLE}" no longer exists' in errors[0], errors
        lines = json_log(log)
        fatal = [line for line in lines if line["msg"] == "stopping after a fatal error"]
        assert len(fatal) == 1  # one stop, no restart loop
        summary = [line for line in lines if line["msg"].startswith("stopped")]
        assert len(summary) == 1 and summary[0]["abandoned"] == 0  # drained: handlers finished
        assert "Traceback" not in log
    with pytest.raises(dynamodb.exceptions.ResourceNotFoundException):
        dynamodb.describe_table(TableName=TABLE)  # nobody recreated it
    assert not tally.lost and not tally.unknown
    assert tally.handled + tally.left == tally.sent
    assert not handled_and_left and not tally.duplicated
