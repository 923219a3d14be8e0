"""The deterministic simulation: the fake DynamoDB itself, replay, and many seeded schedules.

`SQSB_SIM_SEEDS` sets how many schedules run (2,000 by default; 100000 for the long mode),
`SQSB_SIM_FIRST_SEED` where they start. A failing seed is printed with its story and
replays exactly with `simfaults.run(seed)`.
"""

from __future__ import annotations

import os

import pytest
from botocore.exceptions import ClientError
from simdb import SimClient, SimDynamoDB, SimTable
from simfaults import KINDS, run

from sqsbalancerd.coordination.table import SHARDS, ConditionFailed, CoordinationTable, MemberRecord

SEEDS = int(os.environ.get("SQSB_SIM_SEEDS", "2000"))
FIRST_SEED = int(os.environ.get("SQSB_SIM_FIRST_SEED", "0"))
# Every fault but a hand-deleted ownership row: its exclusivity rests on the holder's sweep
# coming before the acquirer's wait ends, which a long handoff can defeat (pinned by the
# regression seeds instead; see docs/coordination-cost.md for what is open).
CI_KINDS = tuple(kind for kind in KINDS if kind != "delete_ownership_row")
SAFETY = {"exclusive", "exit", "replicas"}
# Liveness (settled within the bound, quiet table after) is still missed by a few
# schedules in a thousand (a handoff finishing just past the bound, a stale row left for
# the next sweep): allowed up to this share, every one printed; safety never.
LIVENESS_MISS_LIMIT = 0.01


class _Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def monotonic(self) -> float:
        return self.now_s

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now_s


def _table(db: SimDynamoDB, clock: _Clock) -> CoordinationTable:
    db.items.setdefault("t", {})
    return CoordinationTable(SimClient(db), table_name="t", application="a", clock=clock)  # type: ignore[arg-type]


def _member(instance_id: str, counter: int = 1) -> MemberRecord:
    return MemberRecord(instance_id, "h", "active", counter, "e", 1, 1.0, 1.0)


def test_fake_dynamodb_honours_conditions_and_pages() -> None:
    clock = _Clock()
    db = SimDynamoDB(clock.monotonic, page_items=2)
    table = _table(db, clock)
    for index in range(5):
        table.create_member(_member(f"m{index}"))
    with pytest.raises(ConditionFailed):
        table.create_member(_member("m0"))
    assert table.heartbeat("m1", epoch="e", status="active", now_wall=2.0) == 2
    with pytest.raises(ConditionFailed):
        table.heartbeat("m1", epoch="other", status="active", now_wall=2.0)
    assert sorted(r.instance_id for r in table.members()) == [f"m{i}" for i in range(5)]
    lease = table.acquire("q", "url", owner="m0", previous=None, now_wall=1.0)
    with pytest.raises(ConditionFailed):
        table.acquire("q", "url", owner="m1", previous=None, now_wall=1.0)
    table.release("q", owner="m0", lease=lease, now_wall=1.0)
    assert table.ownership()["q"].owner is None
    # 5 members in pages of 2, and one page per ownership shard: pagination was followed.
    client = table._db  # type: ignore[attr-defined]
    assert client.meter.requests["query"] == 3 + SHARDS


def test_fake_dynamodb_throttles_a_hot_partition() -> None:
    clock = _Clock()
    db = SimDynamoDB(clock.monotonic, write_units_s=3)
    table = _table(db, clock)
    for index in range(3):
        table.create_member(_member(f"m{index}"))
    with pytest.raises(ClientError) as caught:
        table.create_member(_member("m3"))
    assert caught.value.response["Error"]["Code"] == "ProvisionedThroughputExceededException"
    clock.now_s += 1.0  # the next second has room again
    table.create_member(_member("m3"))


def test_fake_dynamodb_eventually_consistent_reads_can_lag() -> None:
    clock = _Clock()
    db = SimDynamoDB(clock.monotonic)
    db.items["t"] = SimTable()
    table = _table(db, clock)
    db.allow_stale_reads(0.0, history_s=60.0)
    table.create_member(_member("m0"))
    clock.now_s = 10.0
    db.frozen_at_s = 5.0  # a stalled replica
    table.heartbeat("m0", epoch="e", status="active", now_wall=2.0)
    table.create_member(_member("m1"))
    assert [(r.instance_id, r.counter) for r in table.members(consistent=False)] == [("m0", 1)]
    current = table.members(consistent=True)
    assert [(r.instance_id, r.counter) for r in current] == [("m0", 2), ("m1", 1)]
    db.frozen_at_s = None  # caught up: no lag left
    assert len(table.members(consistent=False)) == 2
    meter = table._db.meter  # type: ignore[attr-defined]
    assert meter.read_units == 0.5 + 1.0 + 0.5  # eventually consistent reads cost half


def test_a_seed_replays_exactly() -> None:
    first, second = run(7, kinds=KINDS), run(7, kinds=KINDS)
    assert first.log == second.log
    assert [str(v) for v in first.violations] == [str(v) for v in second.violations]


# ~25 ms of CPU a schedule (2,000: under a minute); the wall-clock limit leaves room for a
# loaded shared machine and for SQSB_SIM_SEEDS in the long mode.
@pytest.mark.timeout(max(300, SEEDS // 5))
def test_seeded_schedules_hold_every_invariant() -> None:
    unsafe, unsettled = [], []
    for seed in range(FIRST_SEED, FIRST_SEED + SEEDS):
        result = run(seed, kinds=CI_KINDS)
        if not result.violations:
            continue
        line = f"seed {seed}: {result.violations[0]} (faults: {result.faults})"
        (unsafe if result.kinds & SAFETY else unsettled).append(line)
    assert not unsafe, f"{len(unsafe)} of {SEEDS} schedules broke safety:\n" + "\n".join(unsafe)
    assert len(unsettled) <= LIVENESS_MISS_LIMIT * SEEDS, "\n".join(unsettled)
