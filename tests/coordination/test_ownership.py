import dataclasses
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sqsbalancerd.coordination.ownership import OwnershipDiff, owned_by, plan
from sqsbalancerd.coordination.ring import rebalance

MEMBERS = ["instance-a", "instance-b", "instance-c"]
QUEUES = [f"queue-{index:02d}" for index in range(24)]
VIRTUAL_NODES = 150
LOAD_FACTOR = 1.1

names = st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=10)
fast = settings(max_examples=60, deadline=None)


# The rows once the three have shared the queues out from nothing.
SETTLED = rebalance(QUEUES, MEMBERS, {}, virtual_nodes=VIRTUAL_NODES, load_factor=LOAD_FACTOR)


def plan_for(
    me: str,
    currently_owned: frozenset[str] | set[str] = frozenset(),
    owners: dict[str, str] | None = None,
) -> OwnershipDiff:
    return plan(
        queues=QUEUES,
        members=MEMBERS,
        me=me,
        currently_owned=currently_owned,
        owners=SETTLED if owners is None else owners,
        virtual_nodes=VIRTUAL_NODES,
        load_factor=LOAD_FACTOR,
    )


def target_of(me: str) -> frozenset[str]:
    return owned_by(SETTLED, me)


def test_owned_by_picks_the_members_queues() -> None:
    assignment = {"orders": "instance-a", "emails": "instance-b", "jobs": "instance-a"}
    assert owned_by(assignment, "instance-a") == {"orders", "jobs"}
    assert owned_by(assignment, "instance-z") == frozenset()


def test_a_fresh_instance_acquires_its_whole_share() -> None:
    diff = plan_for("instance-a", owners={})
    assert diff.to_acquire == target_of("instance-a")
    assert diff.to_release == diff.keep == frozenset()
    assert diff.has_changes


def test_an_instance_already_owning_its_share_changes_nothing() -> None:
    target = target_of("instance-b")
    diff = plan_for("instance-b", target)
    assert diff == OwnershipDiff(to_acquire=frozenset(), to_release=frozenset(), keep=target)
    assert not diff.has_changes


def test_queues_owned_elsewhere_or_gone_are_released() -> None:
    target = target_of("instance-a")
    someone_elses = next(iter(target_of("instance-b")))
    diff = plan_for("instance-a", set(target) | {someone_elses, "deleted-queue"})
    assert diff.to_release == {someone_elses, "deleted-queue"}
    assert diff.keep == target
    assert diff.owned_after == target


def test_an_instance_outside_the_live_set_releases_everything() -> None:
    diff = plan_for("instance-expired", {"queue-01", "queue-02"})
    assert diff.to_release == {"queue-01", "queue-02"}
    assert diff.to_acquire == diff.keep == frozenset()


def test_a_plan_keeps_what_the_rows_give_each_member_when_balance_allows() -> None:
    """Rows where a and b traded one queue each are still balanced: nobody moves anything
    back (a stateless ring would undo the trade)."""
    queue_a, queue_b = sorted(target_of("instance-a"))[0], sorted(target_of("instance-b"))[0]
    traded = {**SETTLED, queue_a: "instance-b", queue_b: "instance-a"}
    diff = plan_for("instance-a", owned_by(traded, "instance-a"), owners=traded)
    assert not diff.has_changes
    assert queue_b in diff.keep


def test_the_diff_is_frozen() -> None:
    diff = plan_for("instance-a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        diff.keep = frozenset()  # type: ignore[misc]


@fast
@given(
    queues=st.frozensets(names, max_size=30),
    members=st.frozensets(names, min_size=1, max_size=5),
    currently_owned=st.frozensets(names, max_size=10),
    rows=st.dictionaries(names, names, max_size=30),
)
def test_plans_split_every_queue_between_the_members(
    queues: frozenset[str],
    members: frozenset[str],
    currently_owned: frozenset[str],
    rows: dict[str, str],
) -> None:
    diffs = {
        member: plan(
            queues=queues,
            members=members,
            me=member,
            currently_owned=currently_owned,
            owners=rows,
            virtual_nodes=20,
            load_factor=LOAD_FACTOR,
        )
        for member in members
    }
    owned_after = [diff.owned_after for diff in diffs.values()]
    assert frozenset().union(*owned_after) == queues
    assert sum(len(owned) for owned in owned_after) == len(queues)
    for diff in diffs.values():
        assert diff.keep | diff.to_release == currently_owned
        assert not diff.keep & diff.to_acquire
        assert not diff.keep & diff.to_release
