"""A FIFO queue shared by two owners (replica rows, coordination/replicas.py) keeps each
message group's order: SQS hands a group to one receiver at a time, so the two engines'
receives never split a group while any of its messages is in flight."""

from __future__ import annotations

from typing import Any

from enginekit import Rig

GROUPS = ("g0", "g1", "g2", "g3")
PER_GROUP = 15


def test_two_owners_of_a_fifo_queue_keep_every_groups_order(moto_sqs: Any) -> None:
    handled: list[tuple[str, str, int]] = []  # (owner, group, sequence)

    def recorder(owner: str) -> Any:
        def handle(message: Any) -> None:
            group, sequence = message.body.split(":")
            handled.append((owner, group, int(sequence)))

        return handle

    a = Rig(moto_sqs, name="shared.fifo", handler=recorder("a"), max_messages=3)
    b = Rig(moto_sqs, name="shared.fifo", handler=recorder("b"), max_messages=3)
    assert a.url == b.url
    for sequence in range(PER_GROUP):
        for group in GROUPS:
            a.send(f"{group}:{sequence}", group=group)
    for _ in range(200):
        if len(handled) >= len(GROUPS) * PER_GROUP:
            break
        # Both receive before either deletes: what each holds is in flight at once.
        a.receive()
        b.receive()
        start = len(handled)
        a.work_all()
        b.work_all()
        by_owner: dict[str, set[str]] = {"a": set(), "b": set()}
        for owner, group, _ in handled[start:]:
            by_owner[owner].add(group)
        assert not by_owner["a"] & by_owner["b"], "a group was in flight at both owners"
        a.flush()
        b.flush()
    assert len(handled) == len(GROUPS) * PER_GROUP
    assert {owner for owner, _, _ in handled} == {"a", "b"}  # shared, not one owner's
    for group in GROUPS:
        sequence = [s for _, g, s in handled if g == group]
        assert sequence == list(range(PER_GROUP)), (group, sequence)
