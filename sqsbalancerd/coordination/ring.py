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

import heapq
import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator
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
    if virtual_nodes < 1:
        raise ValueError("virtual_nodes must be at least 1")
    unique_queues = sorted(set(queues))
    unique_members = sorted(set(members))
    if not unique_members or not unique_queues:
        return {}
    ring, continuum = _build_ring(unique_members, virtual_nodes)
    walks = {queue: _clockwise_members(continuum, ring.get_key(queue)) for queue in unique_queues}
    if not bounded:
        return {queue: next(walk)[1] for queue, walk in walks.items()}
    limit = capacity(
        queue_count=len(unique_queues),
        member_count=len(unique_members),
        load_factor=load_factor,
    )
    return _place_nearest_first(walks, limit)


def _build_ring(members: list[str], virtual_nodes: int) -> tuple[HashRing, _Continuum]:
    # Sorted members: if two points ever collided, uhashring keeps the last writer, so the
    # insertion order must not depend on the caller's order.
    ring = HashRing(nodes=members, vnodes=virtual_nodes)
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


def _place_nearest_first(walks: dict[str, Iterator[tuple[int, str]]], limit: int) -> dict[str, str]:
    """Settle (queue, candidate) pairs nearest first; a full candidate sends the queue onward.

    Popping pairs in global distance order means a member never has to give a queue back:
    every later claim on it is farther than the ones it already holds.
    """
    pending: list[tuple[int, str, str]] = []
    for queue, walk in walks.items():
        distance, member = next(walk)
        pending.append((distance, queue, member))
    heapq.heapify(pending)
    loads: Counter[str] = Counter()
    owners: dict[str, str] = {}
    while pending:
        _, queue, member = heapq.heappop(pending)
        if loads[member] < limit:
            loads[member] += 1
            owners[queue] = member
            continue
        # Total capacity covers every queue, so a queue always finds a member with room
        # before its walk runs out.
        next_distance, next_member = next(walks[queue])
        heapq.heappush(pending, (next_distance, queue, next_member))
    return owners
