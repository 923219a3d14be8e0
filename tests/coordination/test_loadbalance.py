"""Load-aware assignment from the member rows: the epoch, the frozen context, the plan."""

from __future__ import annotations

import boto3
from moto import mock_aws
from support import FakeClock

from sqsbalancerd.coordination import loadsummary
from sqsbalancerd.coordination.loadbalance import assign, complete_context, epoch_of
from sqsbalancerd.coordination.loadplan import PlanSettings
from sqsbalancerd.coordination.loadsummary import LoadSummary, QueueSample
from sqsbalancerd.coordination.table import CoordinationTable, MemberRecord, OwnershipRecord

SETTINGS = PlanSettings(max_replicas=1, min_dwell_s=0.0)


def _record(
    instance_id: str, *, heartbeat_at: float = 1000.0, epoch: str = "", summary: str = ""
) -> MemberRecord:
    return MemberRecord(
        instance_id,
        "h",
        "active",
        1,
        "e",
        2,
        heartbeat_at,
        0.0,
        load_epoch=epoch,
        load=summary,
        workers=4,
    )


def _summary(utilisation: float, **loads: float) -> str:
    samples = tuple(QueueSample(q, v, v * 10, 0) for q, v in loads.items())
    return loadsummary.encode(LoadSummary(utilisation, samples))


def test_the_epoch_is_named_by_the_lowest_member_and_its_heartbeat() -> None:
    records = {"b": _record("b", heartbeat_at=1e9), "a": _record("a", heartbeat_at=125.0)}
    epoch = epoch_of(("a", "b"), records, 60.0)
    assert epoch is not None and (epoch.token, epoch.now_s) == ("a:2", 120.0)
    assert epoch_of(("a", "b"), {"b": records["b"]}, 60.0) is None  # no row read for it
    assert epoch_of((), records, 60.0) is None


def test_an_epoch_completes_only_when_every_member_published_for_it() -> None:
    records = {
        "a": _record("a", epoch="a:16", summary=_summary(0.9, hot=3.0)),
        "b": _record("b", epoch="a:15", summary=_summary(0.1)),
    }
    epoch = epoch_of(("a", "b"), records, 60.0)
    assert epoch is not None and epoch.token == "a:16"
    assert complete_context(epoch, ("a", "b"), records) is None
    records["b"] = _record("b", epoch="a:16", summary="garbage")  # decodes as idle
    context = complete_context(epoch, ("a", "b"), records)
    assert context is not None
    assert context.loads["hot"].handler_s_per_s == 3.0
    assert context.members["a"].listed == 3.0 and context.members["b"].utilisation == 0.0


def test_every_reader_plans_the_same_from_the_same_rows_and_a_balanced_load_stays() -> None:
    queues = tuple(f"q{i}" for i in range(8))
    summary_a = _summary(0.95, q0=1.9, q1=1.9)  # both hot queues on a, b idle
    records = {
        "a": _record("a", epoch="a:16", summary=summary_a),
        "b": _record("b", epoch="a:16", summary=_summary(0.0)),
    }
    epoch = epoch_of(("a", "b"), records, 60.0)
    assert epoch is not None
    context = complete_context(epoch, ("a", "b"), records)
    assert context is not None
    owners = {q: "a" if q in ("q0", "q1", "q2", "q3") else "b" for q in queues}
    rows = {q: OwnershipRecord(q, "u", o, 1, 0.0) for q, o in owners.items()}
    plans = [
        assign(
            context,
            queues=queues,
            members=("a", "b"),
            rows=dict(reversed(rows.items())),
            owners=dict(sorted(owners.items(), reverse=reverse)),
            settings=SETTINGS,
        )
        for reverse in (False, True)
    ]
    assert plans[0] == plans[1]
    moved = {m.queue for m in plans[0].moves}
    assert moved and moved <= {"q0", "q1"} and len(moved) == 1  # one hot queue goes to b
    assert all("balance" in m.reason for m in plans[0].moves)
    # Measured again after the move: nothing more moves (steady state).
    (stays,) = {"q0", "q1"} - moved
    (went,) = moved
    records = {
        "a": _record("a", epoch="a:16", summary=_summary(0.5, **{stays: 1.9})),
        "b": _record("b", epoch="a:16", summary=_summary(0.5, **{went: 1.9})),
    }
    context = complete_context(epoch, ("a", "b"), records)
    assert context is not None
    again = assign(
        context,
        queues=queues,
        members=("a", "b"),
        rows=rows,
        owners=plans[0].owners,
        settings=SETTINGS,
    )
    assert again.moves == ()


def test_the_heartbeat_publishes_a_summary_only_when_given_one() -> None:
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        table = CoordinationTable(client, table_name="t", application="a", clock=FakeClock())
        table.ensure(create=True, region="us-east-1")
        table.create_member(_record("m"))
        table.heartbeat(
            "m", epoch="e", status="active", now_wall=5.0, load=("m:1", "1|500|", 8, 60.0)
        )
        table.heartbeat("m", epoch="e", status="active", now_wall=6.0)
        (row,) = table.members()
        assert (row.load_epoch, row.load, row.workers, row.load_joined) == (
            "m:1",
            "1|500|",
            8,
            60.0,
        )
