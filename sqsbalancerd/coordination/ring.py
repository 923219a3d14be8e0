"""Queue → member assignment: consistent hashing with bounded loads over a uhashring ring.

Pure: the same queue and member sets give the same assignment on every instance, whatever the
input order, so instances agree on ownership without talking to each other.

uhashring supplies the ring (each member's virtual-node points) and the key hash. A queue's
candidates are the distinct members met walking clockwise from the queue's hash point, which is
exactly uhashring's ``iterate_nodes`` order; the first one is plain ``get_node``.

Bounded loads (Mirrokni, Thorup, Zadimoghaddam): no member takes more than
``ceil(load_factor * queues / members)`` queues; a queue whose nearer candidates are full goes
on clockwise to the next one with room. Which queues win a contested member decides how many
queues move when membership changes. Here the nearest (queue, member) pairs along the ring
claim first; that gives a single answer regardless of processing order (the unique stable
matching where both sides rank by ring distance), and adding a member never pushes a queue to a
farther member while the capacity stays the same.
"""

import functools
import heapq
import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction

from uhashring import HashRing

# uhashring's default hash is the 128-bit md5 integer; distances wrap around at this size.
_RING_SIZE = 1 << 128


@dataclass(frozen=True, slots=True)
class _Continuum:
    """The ring's points in clockwise order and the member owning each."""

    positions: list[int]
    members: list[str]
    member_count: int


def capacity(*, queue_count: int, member_count: int, load_factor: float) -> int:
    """Most queues one member may own: ``ceil(load_factor * queue_count / member_count)``."""
    if member_count < 1:
        raise ValueError("member_count must be at least 1")
    if load_factor < 1:
        raise ValueError(f"load_factor must be at least 1 to fit every queue, got {load_factor}")
    # Read the factor as the decimal that was written: 1.1 * 10_000 / 500 in floats is
    # 22.000000000000004 and would round up to 23.
    exact_factor = Fraction(repr(load_factor))
    return math.ceil(exact_factor * queue_count / member_count)


def assign(
    queues: Iterable[str],
    members: Iterable[str],
    *,
    virtual_nodes: int = 150,
    load_factor: float = 1.10,
    bounded: bool = True,
) -> dict[str, str]:
    """Map every queue to one member; empty when there are no members.

    With ``bounded=False`` each queue goes to its plain uhashring owner (``get_node``), which
    the simulation uses as the baseline.
    """
    layout = _layout(queues, members, virtual_nodes=virtual_nodes, load_factor=load_factor)
    if layout is None:
        return {}
    walks = {
        queue: _clockwise_members(layout.continuum, key_hash)
        for queue, key_hash in layout.hashes.items()
    }
    if not bounded:
        return {queue: next(walk)[1] for queue, walk in walks.items()}
    return _place_nearest_first(walks, dict.fromkeys(layout.members, layout.limit))


@dataclass(frozen=True, slots=True)
class _Layout:
    """The sorted, de-duplicated inputs with their ring: what both assignments start from."""

    members: list[str]
    hashes: dict[str, int]  # queue -> its point on the ring, in queue order
    continuum: _Continuum
    low: int  # floor(Q/N)
    limit: int  # capacity


def _layout(
    queues: Iterable[str], members: Iterable[str], *, virtual_nodes: int, load_factor: float
) -> _Layout | None:
    if virtual_nodes < 1:
        raise ValueError("virtual_nodes must be at least 1")
    unique_queues = sorted(set(queues))
    unique_members = sorted(set(members))
    if not unique_members or not unique_queues:
        return None
    ring, continuum = _build_ring(tuple(unique_members), virtual_nodes)
    return _Layout(
        members=unique_members,
        hashes={queue: ring.get_key(queue) for queue in unique_queues},
        continuum=continuum,
        low=len(unique_queues) // len(unique_members),
        limit=capacity(
            queue_count=len(unique_queues),
            member_count=len(unique_members),
            load_factor=load_factor,
        ),
    )


@functools.lru_cache(maxsize=2)
def _build_ring(members: tuple[str, ...], virtual_nodes: int) -> tuple[HashRing, _Continuum]:
    """Remembered for the current and the next membership: a handoff replans every round
    from new rows but the same members, and at 500 members a ring is 75,000 md5 points
    (about half a second of CPU). Callers only read the ring."""
    # Sorted members: if two points ever collided, uhashring keeps the last writer, so the
    # insertion order must not depend on the caller's order.
    ring = HashRing(nodes=list(members), vnodes=virtual_nodes)
    points: list[tuple[int, str]] = ring.get_points()
    continuum = _Continuum(
        positions=[position for position, _ in points],
        members=[member for _, member in points],
        member_count=len(members),
    )
    return ring, continuum


def _clockwise_members(continuum: _Continuum, key_hash: int) -> Iterator[tuple[int, str]]:
    """Yield (ring distance, member) for each distinct member clockwise from ``key_hash``.

    Starts where uhashring's ``get_node`` looks (first point strictly after the hash, wrapping
    to the start), so the first member yielded is the plain owner.
    """
    positions, owners = continuum.positions, continuum.members
    point_count = len(positions)
    start = bisect_right(positions, key_hash)
    seen: set[str] = set()
    for step in range(point_count):
        index = (start + step) % point_count
        member = owners[index]
        if member in seen:
            continue
        seen.add(member)
        yield (positions[index] - key_hash) % _RING_SIZE, member
        if len(seen) == continuum.member_count:
            return


def _place_nearest_first(
    walks: Mapping[str, Iterator[tuple[int, str]]], room: Mapping[str, int]
) -> dict[str, str]:
    """Settle (queue, candidate) pairs nearest first; a full candidate sends the queue onward.

    Popping pairs in global distance order means a member never has to give a queue back:
    every later claim on it is farther than the ones it already holds. Queues left over when
    every member's ``room`` is used up stay unplaced (absent from the result).
    """
    left = dict(room)
    room_total = sum(left.values())
    pending: list[tuple[int, str, str]] = []
    for queue, walk in walks.items():
        distance, member = next(walk)
        pending.append((distance, queue, member))
    heapq.heapify(pending)
    owners: dict[str, str] = {}
    while pending and room_total > 0:
        _, queue, member = heapq.heappop(pending)
        if left.get(member, 0) > 0:
            left[member] -= 1
            room_total -= 1
            owners[queue] = member
            continue
        # Some member still has room, so the walk (which meets every member) reaches it.
        next_distance, next_member = next(walks[queue])
        heapq.heappush(pending, (next_distance, queue, next_member))
    return owners


@dataclass(frozen=True, slots=True)
class _MemberPoints:
    """Each member's own ring points, sorted: the distance from a queue to one member."""

    by_member: dict[str, list[int]]

    @classmethod
    def of(cls, continuum: _Continuum) -> "_MemberPoints":
        by_member: dict[str, list[int]] = {}
        for position, member in zip(continuum.positions, continuum.members, strict=True):
            by_member.setdefault(member, []).append(position)  # positions come sorted
        return cls(by_member)

    def distance(self, key_hash: int, member: str) -> int:
        """Clockwise distance from ``key_hash`` to ``member``'s first point (as the walk)."""
        positions = self.by_member[member]
        index = bisect_right(positions, key_hash) % len(positions)
        return (positions[index] - key_hash) % _RING_SIZE


def _keep_current(
    hashes: Mapping[str, int], current: Mapping[str, str], points: _MemberPoints, high: int
) -> dict[str, str]:
    """Queues that stay put: current owner still a member, up to ``high`` each (nearest)."""
    held: dict[str, list[tuple[int, str]]] = {}
    for queue, key_hash in hashes.items():
        owner = current.get(queue)
        if owner in points.by_member:
            held.setdefault(owner, []).append((points.distance(key_hash, owner), queue))
    kept: dict[str, str] = {}
    for owner, claims in held.items():
        for _, queue in sorted(claims)[:high]:
            kept[queue] = owner
    return kept


def _level_up(
    owners: dict[str, str],
    loads: Counter[str],
    hashes: Mapping[str, int],
    points: _MemberPoints,
    low: int,
) -> None:
    """Bring members below ``low`` up to it with their nearest queues from members above it.

    Nearest claims first across all short members; each short member brings only its few
    nearest candidates to a round (not one per queue: doubling a fleet of 250 over 10,000
    queues would hold millions), and a member still short after them starts another round.
    """
    short = sorted(member for member in points.by_member if loads[member] < low)
    moved: set[str] = set()
    while short:
        claims: list[tuple[int, str, str]] = []
        for member in short:
            candidates = (
                (points.distance(key_hash, member), queue, member)
                for queue, key_hash in hashes.items()
                if queue not in moved and loads[owners[queue]] > low
            )
            claims += heapq.nsmallest(2 * (low - loads[member]) + 8, candidates)
        heapq.heapify(claims)
        while claims:
            _, queue, member = heapq.heappop(claims)
            donor = owners[queue]
            if loads[member] >= low or queue in moved or loads[donor] <= low:
                continue
            owners[queue] = member
            loads[donor] -= 1
            loads[member] += 1
            moved.add(queue)
        # Each round moves at least its nearest claim (valid when built), so this ends.
        short = [member for member in short if loads[member] < low]


def rebalance(
    queues: Iterable[str],
    members: Iterable[str],
    current: Mapping[str, str],
    *,
    virtual_nodes: int = 150,
    load_factor: float = 1.10,
) -> dict[str, str]:
    """Move as few queues as balance needs, starting from the ``current`` owners.

    Every member ends with between ``floor(Q/N)`` and ``capacity`` queues. A queue stays
    with its current owner while that owner is a member with room; the others (new queues,
    queues of members that left, a member's excess over capacity) go to the nearest members
    below ``floor(Q/N)`` first, then to the nearest with room. A member still short (a
    newcomer) takes its nearest queues from members above ``floor(Q/N)``.

    So a join moves about ``floor(Q/(N+1))`` queues and a leave moves the leaver's queues
    (the stateless `assign` moves about 1.5 times that). The price is history: instances
    agree because they read the same ownership rows, and the result is a fixed point
    (applied to its own output it changes nothing).
    """
    queue_set = frozenset(queues)
    history = frozenset((q, owner) for q, owner in current.items() if q in queue_set)
    key = (queue_set, frozenset(members), history, virtual_nodes, load_factor)
    return dict(_rebalance_cached(key))


@functools.lru_cache(maxsize=4)
def _rebalance_cached(
    key: tuple[frozenset[str], frozenset[str], frozenset[tuple[str, str]], int, float],
) -> dict[str, str]:
    """rebalance, remembered: a handoff checks its rows against the same plan each round,
    and every instance of a simulated cluster plans from the same rows."""
    queues, members, history, virtual_nodes, load_factor = key
    return _rebalance(sorted(queues), sorted(members), dict(history), virtual_nodes, load_factor)


def _rebalance(
    queues: list[str],
    members: list[str],
    current: Mapping[str, str],
    virtual_nodes: int,
    load_factor: float,
) -> dict[str, str]:
    layout = _layout(queues, members, virtual_nodes=virtual_nodes, load_factor=load_factor)
    if layout is None:
        return {}
    points = _MemberPoints.of(layout.continuum)
    owners = _keep_current(layout.hashes, current, points, layout.limit)
    loads = Counter(dict.fromkeys(layout.members, 0))
    loads.update(owners.values())
    orphans = [queue for queue in layout.hashes if queue not in owners]
    for limit in (layout.low, layout.limit):
        room = {member: max(0, limit - loads[member]) for member in layout.members}
        walks = {q: _clockwise_members(layout.continuum, layout.hashes[q]) for q in orphans}
        placed = _place_nearest_first(walks, room)
        owners.update(placed)
        loads.update(placed.values())
        orphans = [queue for queue in orphans if queue not in placed]
    _level_up(owners, loads, layout.hashes, points, layout.low)
    return owners
