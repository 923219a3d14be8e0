import math
import random
import string
from collections import Counter
from collections.abc import Mapping

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from uhashring import HashRing

from sqsbalancerd.coordination.ring import assign, capacity, rebalance

RING_SIZE = 1 << 128
MEMBERS_ABC = ["instance-a", "instance-b", "instance-c"]

names = st.text(alphabet=string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=12)
queue_sets = st.frozensets(names, max_size=40)
member_sets = st.frozensets(names.map(lambda name: f"member-{name}"), min_size=1, max_size=6)
virtual_node_counts = st.integers(min_value=1, max_value=40)
load_factors = st.sampled_from([1.0, 1.05, 1.1, 1.25, 1.5, 2.0])
# Small rings keep each example well under a millisecond; the deadline only adds CI flakiness.
fast = settings(max_examples=60, deadline=None)


def ring_distance(ring: HashRing, queue: str, member: str) -> int:
    """Clockwise distance from the queue's hash to the member's next point, as get_node walks."""
    key: int = ring.get_key(queue)
    points: list[int] = [position for position, owner in ring.get_points() if owner == member]
    after = [position for position in points if position > key]
    return ((min(after) if after else min(points)) - key) % RING_SIZE


def loads(assignment: Mapping[str, str]) -> Counter[str]:
    return Counter(assignment.values())


def test_no_members_assigns_nothing() -> None:
    assert assign(["orders"], []) == {}


def test_no_queues_assigns_nothing() -> None:
    assert assign([], MEMBERS_ABC) == {}


def test_capacity_reads_the_load_factor_as_written() -> None:
    # 1.1 * 10_000 / 500 is 22.000000000000004 in floats.
    assert capacity(queue_count=10_000, member_count=500, load_factor=1.1) == 22
    assert capacity(queue_count=24, member_count=3, load_factor=1.1) == 9
    assert capacity(queue_count=12, member_count=3, load_factor=1.1) == 5


@pytest.mark.parametrize(
    ("queue_count", "member_count", "load_factor"), [(10, 0, 1.1), (10, 2, 0.99)]
)
def test_capacity_rejects_settings_that_cannot_fit_every_queue(
    queue_count: int, member_count: int, load_factor: float
) -> None:
    with pytest.raises(ValueError):
        capacity(queue_count=queue_count, member_count=member_count, load_factor=load_factor)


def test_assign_rejects_zero_virtual_nodes() -> None:
    with pytest.raises(ValueError):
        assign(["orders"], MEMBERS_ABC, virtual_nodes=0)


@fast
@given(queues=queue_sets, members=member_sets, virtual_nodes=virtual_node_counts)
def test_plain_assignment_is_uhashring_get_node(
    queues: frozenset[str], members: frozenset[str], virtual_nodes: int
) -> None:
    ring = HashRing(nodes=sorted(members), vnodes=virtual_nodes)
    plain = assign(queues, members, virtual_nodes=virtual_nodes, bounded=False)
    assert plain == {queue: ring.get_node(queue) for queue in queues}


@fast
@given(
    queues=queue_sets,
    members=member_sets,
    virtual_nodes=virtual_node_counts,
    load_factor=load_factors,
)
def test_every_queue_goes_to_one_live_member_within_capacity(
    queues: frozenset[str], members: frozenset[str], virtual_nodes: int, load_factor: float
) -> None:
    assignment = assign(queues, members, virtual_nodes=virtual_nodes, load_factor=load_factor)
    assert set(assignment) == queues
    assert set(assignment.values()) <= members
    if queues:
        limit = capacity(
            queue_count=len(queues), member_count=len(members), load_factor=load_factor
        )
        assert max(loads(assignment).values()) <= limit


@fast
@given(queues=queue_sets, members=member_sets, seed=st.integers(), bounded=st.booleans())
def test_same_result_whatever_the_input_order_or_duplicates(
    queues: frozenset[str], members: frozenset[str], seed: int, bounded: bool
) -> None:
    shuffler = random.Random(seed)
    queue_list, member_list = sorted(queues) * 2, sorted(members) * 2
    shuffler.shuffle(queue_list)
    shuffler.shuffle(member_list)
    expected = assign(sorted(queues), sorted(members), virtual_nodes=10, bounded=bounded)
    assert assign(queue_list, member_list, virtual_nodes=10, bounded=bounded) == expected


@fast
@given(
    queues=queue_sets,
    members=member_sets,
    virtual_nodes=virtual_node_counts,
    load_factor=load_factors,
)
def test_a_queue_passes_a_nearer_member_only_if_nearer_queues_fill_it(
    queues: frozenset[str], members: frozenset[str], virtual_nodes: int, load_factor: float
) -> None:
    assume(queues)
    ring = HashRing(nodes=sorted(members), vnodes=virtual_nodes)
    assignment = assign(queues, members, virtual_nodes=virtual_nodes, load_factor=load_factor)
    limit = capacity(queue_count=len(queues), member_count=len(members), load_factor=load_factor)
    held = loads(assignment)
    for queue, owner in assignment.items():
        own_claim = ring_distance(ring, queue, owner)
        for member in members:
            claim = (ring_distance(ring, queue, member), queue)
            if claim[0] >= own_claim:
                continue
            assert held[member] == limit
            rivals = [other for other, holder in assignment.items() if holder == member]
            assert all((ring_distance(ring, other, member), other) < claim for other in rivals)


@fast
@given(queues=queue_sets, members=member_sets, newcomer=names, virtual_nodes=virtual_node_counts)
def test_a_join_never_pushes_a_queue_to_a_farther_member(
    queues: frozenset[str], members: frozenset[str], newcomer: str, virtual_nodes: int
) -> None:
    joined = members | {f"newcomer-{newcomer}"}
    assume(
        capacity(queue_count=len(queues), member_count=len(members), load_factor=1.1)
        == capacity(queue_count=len(queues), member_count=len(joined), load_factor=1.1)
    )
    ring = HashRing(nodes=sorted(joined), vnodes=virtual_nodes)
    before = assign(queues, members, virtual_nodes=virtual_nodes)
    after = assign(queues, joined, virtual_nodes=virtual_nodes)
    for queue in queues:
        assert ring_distance(ring, queue, after[queue]) <= ring_distance(ring, queue, before[queue])


@fast
@given(queues=queue_sets, members=member_sets, virtual_nodes=virtual_node_counts)
def test_a_leave_never_brings_a_queue_nearer(
    queues: frozenset[str], members: frozenset[str], virtual_nodes: int
) -> None:
    assume(len(members) > 1)
    leaver = min(members)
    remaining = members - {leaver}
    assume(
        capacity(queue_count=len(queues), member_count=len(members), load_factor=1.1)
        == capacity(queue_count=len(queues), member_count=len(remaining), load_factor=1.1)
    )
    ring = HashRing(nodes=sorted(members), vnodes=virtual_nodes)
    before = assign(queues, members, virtual_nodes=virtual_nodes)
    after = assign(queues, remaining, virtual_nodes=virtual_nodes)
    for queue in queues:
        assert ring_distance(ring, queue, after[queue]) >= ring_distance(ring, queue, before[queue])


@fast
@given(queues=st.frozensets(names, min_size=24, max_size=24))
def test_24_queues_over_3_members_stay_within_one_of_even(queues: frozenset[str]) -> None:
    assignment = assign(queues, MEMBERS_ABC)
    assert max(loads(assignment).values()) <= math.ceil(24 / 3) + 1


def test_bounded_loads_evens_out_a_skewed_ring_of_24() -> None:
    queues = [f"queue-{index:02d}" for index in range(24)]
    assert max(loads(assign(queues, MEMBERS_ABC, bounded=False)).values()) == 11
    assert sorted(loads(assign(queues, MEMBERS_ABC)).values()) == [7, 8, 9]


def test_bounded_loads_caps_12_queues_over_3_members_at_5() -> None:
    queues = [f"jobs-{index}" for index in range(12)]
    assert sorted(loads(assign(queues, MEMBERS_ABC, bounded=False)).values()) == [2, 4, 6]
    assert sorted(loads(assign(queues, MEMBERS_ABC)).values()) == [2, 5, 5]


# -- rebalance: bounded loads that keep to the current owners --------------------------------

# Arbitrary history: any queue may be held by anyone, including names that are not members.
histories = st.dictionaries(names, st.one_of(names, names.map(lambda n: f"member-{n}")))


def settled(queues: frozenset[str], members: frozenset[str], virtual_nodes: int) -> dict[str, str]:
    return rebalance(queues, members, {}, virtual_nodes=virtual_nodes)


@fast
@given(
    queues=queue_sets,
    members=member_sets,
    history=histories,
    virtual_nodes=virtual_node_counts,
    load_factor=load_factors,
)
def test_rebalance_gives_every_member_between_the_floor_and_the_capacity(
    queues: frozenset[str],
    members: frozenset[str],
    history: dict[str, str],
    virtual_nodes: int,
    load_factor: float,
) -> None:
    assignment = rebalance(
        queues, members, history, virtual_nodes=virtual_nodes, load_factor=load_factor
    )
    assert set(assignment) == queues
    assert set(assignment.values()) <= members
    if queues:
        limit = capacity(
            queue_count=len(queues), member_count=len(members), load_factor=load_factor
        )
        counts = [loads(assignment)[member] for member in members]
        assert len(queues) // len(members) <= min(counts) and max(counts) <= limit


@fast
@given(queues=queue_sets, members=member_sets, history=histories, virtual_nodes=virtual_node_counts)
def test_rebalance_is_a_fixed_point_and_ignores_input_order(
    queues: frozenset[str], members: frozenset[str], history: dict[str, str], virtual_nodes: int
) -> None:
    assignment = rebalance(queues, members, history, virtual_nodes=virtual_nodes)
    assert rebalance(queues, members, assignment, virtual_nodes=virtual_nodes) == assignment
    shuffled = random.Random(7).sample(sorted(queues), len(queues))
    reordered = dict(reversed(list(history.items())))
    assert (
        rebalance(shuffled, sorted(members, reverse=True), reordered, virtual_nodes=virtual_nodes)
        == assignment
    )


@fast
@given(queues=queue_sets, members=member_sets, newcomer=names, virtual_nodes=virtual_node_counts)
def test_a_join_moves_queues_only_to_the_newcomer_or_off_a_member_over_capacity(
    queues: frozenset[str], members: frozenset[str], newcomer: str, virtual_nodes: int
) -> None:
    joiner = f"newcomer-{newcomer}"
    before = settled(queues, members, virtual_nodes)
    after = rebalance(queues, members | {joiner}, before, virtual_nodes=virtual_nodes)
    limit = capacity(queue_count=len(queues), member_count=len(members) + 1, load_factor=1.1)
    over = {member for member, count in loads(before).items() if count > limit}
    for queue in queues:
        if after[queue] != before[queue]:
            assert after[queue] == joiner or before[queue] in over
    assert loads(after)[joiner] >= len(queues) // (len(members) + 1)


@fast
@given(queues=queue_sets, members=member_sets, virtual_nodes=virtual_node_counts)
def test_a_leave_moves_the_leavers_queues_and_fills_only_members_below_the_floor(
    queues: frozenset[str], members: frozenset[str], virtual_nodes: int
) -> None:
    assume(len(members) > 1)
    leaver = min(members)
    remaining = members - {leaver}
    before = settled(queues, members, virtual_nodes)
    after = rebalance(queues, remaining, before, virtual_nodes=virtual_nodes)
    floor = len(queues) // len(remaining)
    short = {member for member in remaining if loads(before)[member] < floor}
    for queue in queues:
        if after[queue] != before[queue]:
            assert before[queue] == leaver or after[queue] in short


def test_a_join_at_scale_moves_no_more_than_the_newcomers_share() -> None:
    """500 instances, 10,000 queues: a join moves exactly what the newcomer takes, the
    floor of Q/(N+1) (the stateless ring moves about 1.5 times that)."""
    queues = [f"queue-{index:05d}" for index in range(10_000)]
    members = [f"instance-{index:03d}" for index in range(500)]
    before = rebalance(queues, members, {})
    after = rebalance(queues, [*members, "instance-new"], before)
    moved = sum(1 for queue in queues if after[queue] != before[queue])
    assert moved == loads(after)["instance-new"] == 10_000 // 501


def test_a_handoff_replans_over_the_same_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each handoff round plans from new rows but the same members: the ring (virtual-node
    points, the costly part at hundreds of members) is built once for them, not per plan."""
    from sqsbalancerd.coordination import ring as ring_module

    built: list[tuple[str, ...]] = []

    class CountingRing(HashRing):  # type: ignore[misc]
        def __init__(self, nodes: list[str], **kwargs: object) -> None:
            built.append(tuple(nodes))
            super().__init__(nodes=nodes, **kwargs)

    forget = getattr(ring_module._build_ring, "cache_clear", lambda: None)
    monkeypatch.setattr(ring_module, "HashRing", CountingRing)
    forget()
    queues = [f"q-{i}" for i in range(30)]
    members = ["m-0", "m-1", "m-2"]
    owners = rebalance(queues, members, {})
    for step in range(5):  # the history moves each round, the members do not
        moved = dict(owners)
        moved[queues[step]] = members[(members.index(owners[queues[step]]) + 1) % 3]
        owners = rebalance(queues, members, moved)
    rebalance(queues, [*members, "m-3"], owners)
    forget()
    assert built == [tuple(members), (*members, "m-3")]
