"""sweep.inspect: what differs between the ownership rows and what an instance believes."""

from __future__ import annotations

from typing import Any

from sqsbalancerd.coordination.sweep import inspect
from sqsbalancerd.coordination.table import OwnershipRecord


def row(queue: str, owner: str | None, lease: int = 1, **extra: Any) -> OwnershipRecord:
    return OwnershipRecord(queue, f"url/{queue}", owner, lease, 0.0, **extra)


def findings(rows: list[OwnershipRecord], **changes: Any) -> Any:
    values: dict[str, Any] = {
        "me": "a",
        "held": {},
        "unreleased": (),
        "wanted": (),
        "known": {"q1", "q2", "q3"},
        "members": {"a", "b"},
        "is_dead": lambda instance: instance == "dead",
        **changes,
    }
    return inspect({r.queue: r for r in rows}, **values)


def test_steady_rows_need_nothing() -> None:
    found = findings(
        [row("q1", "a", 3), row("q2", "b"), row("q3", "b")], held={"q1": 3}, wanted={"q1"}
    )
    assert not (found.lost or found.missing or found.adopt or found.disown or found.stale)
    assert not found.needs_plan and not found.repair


def test_a_held_row_taken_or_deleted_is_reported() -> None:
    """Defect 8: a hand-deleted row let a second instance acquire while the first consumed."""
    found = findings([row("q1", "b", 4), row("q3", "b")], held={"q1": 3, "q2": 1})
    assert found.lost == {"q1"} and found.missing == {"q2"}


def test_rows_naming_us_that_we_do_not_hold_are_adopted_or_released() -> None:
    found = findings([row("q1", "a", 2), row("q2", "a", 5), row("q3", "b")], wanted={"q1"})
    assert dict(found.adopt) == {"q1": 2} and dict(found.disown) == {"q2": 5}


def test_rows_of_unknown_queues_without_a_live_owner_are_stale() -> None:
    """Defect 8: rows of deleted queues were never removed."""
    rows = [
        row("gone", None, 7),
        row("gone2", "dead", 2),
        row("elsewhere", "b"),
        *[row(q, "b") for q in ("q1", "q2", "q3")],
    ]
    found = findings(rows)
    assert dict(found.stale) == {"gone": 7, "gone2": 2}  # b is alive: its queue may exist


def test_a_known_queue_without_a_live_owner_needs_a_plan() -> None:
    """Defect 6: free rows were picked up only while someone followed a handoff."""
    assert findings([row("q1", None), row("q2", "b"), row("q3", "b")]).needs_plan
    assert findings([row("q2", "b"), row("q3", "b")]).needs_plan  # q1 has no row
    assert findings([row("q1", "gone"), row("q2", "b"), row("q3", "b")]).needs_plan


def test_a_damaged_lease_of_ours_is_repaired() -> None:
    """Defect 8: a lease missing or a string could never be acquired or released again."""
    damaged = row("q1", "a", 0, damaged_lease=("S", "seven"))
    found = findings([damaged, row("q2", "b"), row("q3", "b")], held={"q1": 3})
    assert found.missing == {"q1"}  # held: written again with a fresh lease
    found = findings([damaged, row("q2", "b"), row("q3", "b")])
    assert found.repair == {"q1"} and not found.disown
