"""Load-aware queue placement: balance handler time, not queue counts.

Pure and deterministic: every input is sorted before use, so every instance that reads the
same member rows computes the same plan whatever order it read them in.

Two layers. Idle queues (load at or below ``idle_load``, most of them) are placed by the
count-based `ring.rebalance`, which keeps them with their current owner. Loaded queues go on
top, weighed in handler-seconds per second: each member has a fair share of the total load in
proportion to its (ramped) worker count, and the count bound ``ceil(load_factor * Q / N)``
is kept as a safety net. A queue too hot for one share is split into ``k`` replicas, each
carrying ``load / k``. Current owners are kept; a member is only relieved (or fed) once it is
more than ``tolerance`` away from its fair share, at most ``max_moves`` per round, and a
queue that moved stays put for ``min_dwell_s``. So a steady load moves nothing and noise
below the tolerance never moves anything.
"""

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sqsbalancerd.coordination.ring import capacity, rebalance

Owners = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MemberLoad:
    """A live member as its row reports it."""

    workers: int
    utilisation: float  # busy worker fraction over the last interval, 0..1
    joined_at_s: float
    # The load of the queues its own summary listed (None: what it holds of ``current``).
    # Given, its background stays right when a queue moved since it measured.
    listed: float | None = None


@dataclass(frozen=True, slots=True)
class QueueLoad:
    """A queue's load summed over the summaries of all its owners."""

    handler_s_per_s: float
    is_backlog_growing: bool = False
    # The largest backlog an owner saw (a sampled depth, else its full receives a minute):
    # above 0, messages are still waiting, so its replicas are still needed.
    backlog: int = 0


@dataclass(frozen=True, slots=True)
class PlanSettings:
    load_factor: float = 1.10  # the count bound, as the count-based planner
    tolerance: float = 0.08  # no move while every member is within ±8% of its fair share
    max_moves: int = 8  # loaded-queue moves per round (new queues and leavers' queues are free)
    min_dwell_s: float = 300.0  # a queue that moved stays put this long...
    dwell_override: float = 0.16  # ... unless its member is this far (2x tolerance) off
    ramp_s: float = 600.0  # a newcomer's share grows linearly to full over this time
    ramp_floor: float = 0.25  # ... starting from this fraction of its workers
    idle_load: float = 0.05  # handler-s/s at or below which a queue is placed by count
    replica_share: float = 0.5  # one replica carries at most this much of a mean fair share
    replica_min_load: float = 1.0  # ... but never split below one worker's worth
    replica_shrink: float = 0.7  # k falls only when the smaller k leaves this much headroom
    saturated: float = 0.9  # owners this busy with a growing backlog are starved (see below)
    # A starved queue's demand: its measured load plus the fleet's free capacity, up to
    # this many times its load (k jumps to what that needs in one round, not one a round).
    starved_growth: float = 3.0
    max_replicas: int = 128  # a Zipf tenant of 10% of a 500-instance fleet needs ~100
    max_focus: int = 16  # members tried per move before the round gives up (bounds CPU)
    virtual_nodes: int = 150


@dataclass(frozen=True, slots=True)
class Move:
    queue: str
    before: Owners
    after: Owners
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    owners: dict[str, Owners]
    moved_at_s: dict[str, float]  # feed back as the next round's ``moved_at_s``
    moves: tuple[Move, ...]


@dataclass(slots=True)
class _Board:
    """The plan being built: loaded queues' owners, and each member's load and count."""

    fair: dict[str, float]  # member -> its fair load (handler-s/s)
    load: dict[str, float]
    count: dict[str, int]
    count_limit: int
    share: dict[str, float]  # loaded queue -> load per replica
    owners: dict[str, list[str]] = field(default_factory=dict)
    held: dict[str, set[str]] = field(default_factory=dict)  # member -> its loaded queues
    reasons: dict[str, str] = field(default_factory=dict)
    # member -> idle queues it may give up to make room for a loaded one (not dwelling)
    swappable: dict[str, list[str]] = field(default_factory=dict)
    idle_moved: dict[str, str] = field(default_factory=dict)  # idle queue -> its new owner

    def ratio(self, member: str) -> float:
        return self.load[member] / self.fair[member]

    def add(self, queue: str, member: str) -> None:
        self.owners.setdefault(queue, []).append(member)
        self.held.setdefault(member, set()).add(queue)
        self.load[member] += self.share[queue]
        self.count[member] += 1

    def remove(self, queue: str, member: str) -> None:
        self.owners[queue].remove(member)
        self.held[member].discard(queue)
        self.load[member] -= self.share[queue]
        self.count[member] -= 1


def plan(
    queues: Iterable[str],
    loads: Mapping[str, QueueLoad],
    members: Mapping[str, MemberLoad],
    current: Mapping[str, Owners],
    moved_at_s: Mapping[str, float],
    *,
    now_s: float,
    settings: PlanSettings | None = None,
) -> Plan:
    """Owners for every queue, starting from ``current``; empty when there are no members.

    Agreement needs equal inputs, ``now_s`` included (dwell and ramp read it): instances
    must plan on a shared time (e.g. the round's epoch), not each its own clock.
    """
    settings = settings or PlanSettings()
    names = sorted(set(queues))
    live = sorted(members)
    if not live:
        return Plan({}, {}, ())
    kept = {q: tuple(sorted(m for m in current.get(q, ()) if m in members)) for q in names}
    loaded = [q for q in names if _load(loads, q) > settings.idle_load]
    idle = [q for q in names if _load(loads, q) <= settings.idle_load]
    replicas, starved = _replica_counts(loaded, loads, members, kept, settings)
    # Every queue, not just the idle ones: a queue crossing ``idle_load`` must not change
    # the queue count, or noise at the threshold would move idle queues. History only for
    # the idle ones: loaded queues sit where their weight put them, which would pull the
    # count planner into levelling work it is not given (and cost it its cache).
    idle_owners = rebalance(
        names,
        live,
        {q: kept[q][0] for q in idle if kept[q]},
        virtual_nodes=settings.virtual_nodes,
        load_factor=settings.load_factor,
    )
    board = _new_board(loaded, loads, members, kept, replicas, now_s, settings)
    idle_owners = _stay_idle(
        idle, loaded, kept, idle_owners, limit=board.count_limit, member_count=len(live)
    )
    board.count.update({m: 0 for m in live})
    for queue in idle:
        board.count[idle_owners[queue]] += 1
        if now_s - moved_at_s.get(queue, -math.inf) >= settings.min_dwell_s:
            board.swappable.setdefault(idle_owners[queue], []).append(queue)
    _keep(board, loaded, kept, replicas, members, moved_at_s, now_s, settings)
    _place_unowned(board, loaded, replicas, live)
    dwelling = {q for q in loaded if now_s - moved_at_s.get(q, -math.inf) < settings.min_dwell_s}
    resplit = _resplit_members(board, starved, kept, replicas)
    _balance(board, [m for m in live if m not in resplit], dwelling, settings)
    owners: dict[str, Owners] = {q: (board.idle_moved.get(q, idle_owners[q]),) for q in idle}
    owners.update({q: tuple(sorted(board.owners.get(q, ()))) for q in loaded})
    return _finish(names, owners, current, moved_at_s, board.reasons, now_s)


def _stay_idle(
    idle: list[str],
    loaded: list[str],
    kept: Mapping[str, Owners],
    placed: Mapping[str, str],
    *,
    limit: int,
    member_count: int,
) -> dict[str, str]:
    """Idle queues stay with their live owners while those are within the count bound,
    unless the count planner gives them to a member far short of its share.

    `ring.rebalance` levels every member up to ``floor(Q/N)``; here that can undo the
    weighted layer's work: a queue moved for load, once idle, would go back by count (a
    second handoff for nothing, seen in the bench), and a queue crossing ``idle_load`` would
    shift another. So a member already within the bound's slack below ``floor(Q/N)`` (as
    far below as the bound is above) is not levelled up; a newcomer, far short, still takes
    its share. The bound stays the safety net: a member over it still gives queues up.
    """
    owners = {q: placed[q] for q in idle}
    before = Counter(kept[q][0] for q in idle if kept[q])
    before.update(m for q in loaded for m in kept[q])
    count = Counter(owners.values())
    count.update(m for q in loaded for m in kept[q])
    total = len(idle) + sum(len(kept[q]) for q in loaded)
    low = total // max(1, member_count)
    slack_low = low - max(0, limit - low)
    for queue in idle:
        owner, taker = (kept[queue][0] if kept[queue] else None), owners[queue]
        if owner is None or owner == taker or count[owner] >= limit:
            continue
        if before[taker] < slack_low:
            continue  # a newcomer (or a member far short): it takes its share
        count[taker] -= 1
        count[owner] += 1
        owners[queue] = owner
    return owners


def _load(loads: Mapping[str, QueueLoad], queue: str) -> float:
    entry = loads.get(queue)
    return 0.0 if entry is None else max(0.0, entry.handler_s_per_s)


def _ramp(member: MemberLoad, now_s: float, settings: PlanSettings) -> float:
    """The fraction of its workers a member's fair share counts: grows after it joins."""
    if settings.ramp_s <= 0:
        return 1.0
    age = max(0.0, now_s - member.joined_at_s) / settings.ramp_s
    return min(1.0, max(settings.ramp_floor, age))


def _chunk_limit(
    loads: Mapping[str, QueueLoad], members: Mapping[str, MemberLoad], settings: PlanSettings
) -> float:
    """Most load one replica may carry: a part of a mean member's fair share."""
    total = sum(m.utilisation * m.workers for _, m in sorted(members.items()))
    total = max(total, sum(_load(loads, q) for q in sorted(loads)))
    return max(settings.replica_min_load, settings.replica_share * total / len(members))


def _replica_counts(
    loaded: list[str],
    loads: Mapping[str, QueueLoad],
    members: Mapping[str, MemberLoad],
    kept: Mapping[str, Owners],
    settings: PlanSettings,
) -> tuple[dict[str, int], list[str]]:
    """k per loaded queue: grows at once, to what a starved queue's demand needs in one
    round; shrinks only with headroom (no flapping at an edge) and never while messages
    are still waiting. Also the starved queues."""
    limit = _chunk_limit(loads, members, settings)
    most = max(1, min(settings.max_replicas, len(members)))
    counts: dict[str, int] = {}
    starved: list[str] = []
    for queue in loaded:
        load, now_k = _load(loads, queue), max(1, len(kept[queue]))
        wanted = math.ceil(load / limit)
        if wanted < now_k and loads[queue].backlog > 0:
            wanted = now_k  # a backlog remains: the owners it has are still needed
        elif wanted < now_k:
            wanted = min(now_k, math.ceil(load / (settings.replica_shrink * limit)))
        if _is_starved(loads[queue], kept[queue], members, limit, settings):
            starved.append(queue)
            # It served no more than its owners could: the real demand is higher still.
            # Size k for what the fleet could give it now, not one more owner a round.
            demand = load + min(_spare(members, kept[queue]), settings.starved_growth * load)
            wanted = max(wanted, math.ceil(demand / limit), len(kept[queue]) + 1)
        counts[queue] = max(1, min(most, wanted))
    return counts, starved


def _resplit_members(
    board: _Board, starved: list[str], kept: Mapping[str, Owners], replicas: Mapping[str, int]
) -> set[str]:
    """The owners, old and new, of starved queues that gain owners this round.

    A starved queue's demand is a guess (its owners under-reported it), so its owners'
    loads after the split are unknown until the next round measures them: balancing them
    on the figures from before would move cold queues for a difference the split is about
    to undo (seen in the bench: two drained queues moved in the round that split the hot
    one). A queue split by its measured load carries a known share: no such wait. The
    rest of the fleet balances as usual."""
    found: set[str] = set()
    for queue in starved:
        if replicas[queue] > len(kept[queue]) > 0:
            found.update(kept[queue], board.owners.get(queue, ()))
    return found


def _spare(members: Mapping[str, MemberLoad], owners: Owners) -> float:
    """The fleet's free capacity outside ``owners``, in handler-s/s (idle workers)."""
    return sum(
        max(0.0, 1.0 - m.utilisation) * m.workers
        for name, m in sorted(members.items())
        if name not in owners
    )


def _is_starved(
    load: QueueLoad,
    owners: Owners,
    members: Mapping[str, MemberLoad],
    limit: float,
    settings: PlanSettings,
) -> bool:
    """Its backlog grows while every owner is saturated, and it is a big part of their work.

    A saturated owner under-reports (it serves no more than its workers), so this is what
    says a queue needs more owners than its measured load suggests. Small queues of a
    saturated member are not starved by their owner count: moving work off it fixes them.
    """
    if not owners or not load.is_backlog_growing:
        return False
    if load.handler_s_per_s / len(owners) < limit / 2:
        return False
    return all(members[m].utilisation >= settings.saturated for m in owners)


def _new_board(
    loaded: list[str],
    loads: Mapping[str, QueueLoad],
    members: Mapping[str, MemberLoad],
    kept: Mapping[str, Owners],
    replicas: Mapping[str, int],
    now_s: float,
    settings: PlanSettings,
) -> _Board:
    """Fair shares by ramped workers; each member starts with its background load.

    Background: what its utilisation says it spends beyond the loaded queues it holds (its
    idle queues, overhead). It stays with the member, as its idle queues do.
    """
    live = sorted(members)
    carried = dict.fromkeys(live, 0.0)
    for queue in loaded:
        for member in kept[queue]:
            carried[member] += _load(loads, queue) / len(kept[queue])
    for member in live:
        listed = members[member].listed
        if listed is not None:
            carried[member] = listed
    background = {
        m: max(0.0, members[m].utilisation * members[m].workers - carried[m]) for m in live
    }
    total = sum(background.values()) + sum(_load(loads, q) for q in loaded)
    weights = {m: max(1, members[m].workers) * _ramp(members[m], now_s, settings) for m in live}
    weight_total = sum(weights.values())
    extra = sum(replicas[q] - 1 for q in loaded)
    limit = capacity(
        queue_count=len(kept) + extra, member_count=len(live), load_factor=settings.load_factor
    )
    return _Board(
        fair={m: max(total * weights[m] / weight_total, 1e-9) for m in live},
        load=background,
        count={},
        count_limit=limit,
        share={q: _load(loads, q) / replicas[q] for q in loaded},
    )


def _keep(
    board: _Board,
    loaded: list[str],
    kept: Mapping[str, Owners],
    replicas: Mapping[str, int],
    members: Mapping[str, MemberLoad],
    moved_at_s: Mapping[str, float],
    now_s: float,
    settings: PlanSettings,
) -> None:
    """Loaded queues stay with their live owners; surplus replicas leave the busiest ones."""
    for queue in loaded:
        owners = sorted(kept[queue], key=lambda m: (members[m].utilisation, m))
        is_dwelling = now_s - moved_at_s.get(queue, -math.inf) < settings.min_dwell_s
        if len(owners) > replicas[queue] and is_dwelling:
            # Not yet: keep every owner, each with its now smaller share.
            board.share[queue] = _load_of(board, queue, replicas) / len(owners)
        elif len(owners) > replicas[queue]:
            board.reasons[queue] = f"replicas {len(owners)} -> {replicas[queue]}"
        for member in owners[: max(replicas[queue], len(owners) if is_dwelling else 0)]:
            board.add(queue, member)


def _load_of(board: _Board, queue: str, replicas: Mapping[str, int]) -> float:
    return board.share[queue] * replicas[queue]


def _place_unowned(
    board: _Board, loaded: list[str], replicas: Mapping[str, int], live: list[str]
) -> None:
    """New queues, leavers' queues and new replicas: heaviest first, to the least loaded."""
    for queue in sorted(loaded, key=lambda q: (-board.share[q], q)):
        while len(board.owners.get(queue, ())) < replicas[queue]:
            taken = board.owners.get(queue, [])
            free = [m for m in live if m not in taken]
            if not free:
                break
            roomy = [m for m in free if board.count[m] < board.count_limit] or free
            best = min(
                roomy, key=lambda m: ((board.load[m] + board.share[queue]) / board.fair[m], m)
            )
            board.reasons.setdefault(queue, "new replica" if taken else "unowned")
            board.add(queue, best)


def _balance(board: _Board, live: list[str], dwelling: set[str], settings: PlanSettings) -> None:
    """Up to ``max_moves`` single-replica moves, worst member first, each one improving."""
    moved: set[str] = set()
    for _ in range(settings.max_moves):
        found = _best_move(board, live, moved, dwelling, settings)
        if found is None:
            return
        queue, source, target, swap = found
        board.reasons.setdefault(
            queue,
            f"balance: {source} at {board.ratio(source):.2f}x its fair load,"
            f" {target} at {board.ratio(target):.2f}x",
        )
        board.remove(queue, source)
        board.add(queue, target)
        moved.add(queue)
        if swap:
            _swap_idle(board, swap, source, target, queue)


def _swap_idle(board: _Board, idle_queue: str, source: str, target: str, loaded: str) -> None:
    """The target was at the count bound: one of its idle queues goes the other way."""
    board.swappable[target].remove(idle_queue)
    board.idle_moved[idle_queue] = source
    board.count[target] -= 1
    board.count[source] += 1
    board.reasons[idle_queue] = f"swap: made room on {target} for {loaded}"


def _best_move(
    board: _Board, live: list[str], moved: set[str], dwelling: set[str], settings: PlanSettings
) -> tuple[str, str, str, str] | None:
    """The move that most reduces the worse deviation of its pair, for the worst member
    outside the tolerance that has one; None when all are inside or none can improve.

    Dwelling queues stay put unless the member is past ``dwell_override``: a queue that
    moved onto a member and then grew must not pin that member far above its share.
    """
    outside = [m for m in live if abs(board.ratio(m) - 1) > settings.tolerance]
    worst_first = sorted(outside, key=lambda m: (-abs(board.ratio(m) - 1), m))
    for focus in worst_first[: settings.max_focus]:
        is_far = abs(board.ratio(focus) - 1) > settings.dwell_override
        frozen = moved if is_far else moved | dwelling
        if board.ratio(focus) > 1:
            pairs = [(focus, t) for t in live if t != focus]
        else:
            pairs = [(s, focus) for s in live if s != focus]
        best = min(_candidates(board, pairs, frozen, settings.tolerance), default=None)
        if best is not None:
            return best[1], best[2], best[3], best[4]
    return None


def _candidates(
    board: _Board, pairs: list[tuple[str, str]], frozen: set[str], tolerance: float
) -> Iterable[tuple[float, str, str, str, str]]:
    """(deviation after, queue, source, target, idle queue) for each move that improves its
    pair. A target at the count bound takes a loaded queue only in a swap: one of its idle
    queues goes to the source, so neither count changes (the idle queue is "" otherwise).
    Without it a member full of idle queues stays far below its fair load, and the one
    far above it has nowhere to send its work (seed 43 of the load simulation).

    By at least half the share it moves, or half the tolerance when that is less: a queue
    that only carries the excess over to the other member, leaving it about as far off,
    would go back and forth every dwell (seen in the simulation with one hot queue among
    idle members). Not the whole tolerance: with queues of a third of a fair share, the
    one move that brings a member from 1.25x to 0.92x (its target to 1.18x) would be
    refused, and that member stays at 1.25x (seed 26 of the load simulation). The undo of
    an accepted move is never accepted without a change in load, as it makes its pair
    worse; half the tolerance is still several times the measurement noise of one queue."""
    for source, target in pairs:
        swap = ""
        if board.count[target] >= board.count_limit:
            spare = board.swappable.get(target)
            if not spare:
                continue
            swap = spare[-1]
        before = max(abs(board.ratio(source) - 1), abs(board.ratio(target) - 1))
        for queue in sorted(board.held.get(source, ())):
            if queue in frozen or target in board.owners[queue]:
                continue
            share = board.share[queue]
            after = max(
                abs((board.load[source] - share) / board.fair[source] - 1),
                abs((board.load[target] + share) / board.fair[target] - 1),
            )
            moved = share / min(board.fair[source], board.fair[target])
            if after < before - max(0.01, min(tolerance / 2, moved / 2)):
                yield after, queue, source, target, swap


def _finish(
    names: list[str],
    owners: dict[str, Owners],
    current: Mapping[str, Owners],
    moved_at_s: Mapping[str, float],
    reasons: Mapping[str, str],
    now_s: float,
) -> Plan:
    moves: list[Move] = []
    moved_at: dict[str, float] = {}
    for queue in names:
        before = tuple(sorted(current.get(queue, ())))
        if set(before) != set(owners[queue]):
            moves.append(Move(queue, before, owners[queue], reasons.get(queue, "count")))
            moved_at[queue] = now_s
        elif queue in moved_at_s:
            moved_at[queue] = moved_at_s[queue]
    return Plan(owners, moved_at, tuple(moves))
