"""The dispatcher alone: reservation bounds, fairness, caps, rate, FIFO groups, draining."""

from __future__ import annotations

import threading

from enginekit import body_of, fill, make_item, make_queue
from hypothesis import given, settings
from hypothesis import strategies as st
from support import FakeClock, wait_until

from sqsbalancerd.engine.dispatch import TURN_MESSAGES, Dispatcher
from sqsbalancerd.engine.state import DeliveryState


def new_dispatcher(capacity: int, clock: FakeClock | None = None) -> Dispatcher:
    return Dispatcher(capacity=capacity, clock=clock or FakeClock())


def take_now(dispatcher: Dispatcher):
    return dispatcher.take(timeout_s=0)


# -- reservation --------------------------------------------------------------------------


def test_reserve_never_grants_beyond_capacity_and_running_items_still_hold_room():
    dispatcher = new_dispatcher(capacity=12)  # pool_size 2 + queue_size 10
    queue = make_queue("a")
    dispatcher.add_queue(queue)

    assert dispatcher.reserve(queue, 10, timeout_s=0) == 10
    assert dispatcher.reserve(queue, 10, timeout_s=0) == 2
    assert dispatcher.reserve(queue, 1, timeout_s=0) == 0

    # Fill the 12 slots; starting items does not free room, only finishing does.
    dispatcher.submit(queue, [make_item(queue) for _ in range(12)])
    first, second = take_now(dispatcher), take_now(dispatcher)
    assert dispatcher.reserve(queue, 1, timeout_s=0) == 0
    dispatcher.finish(first)
    assert dispatcher.reserve(queue, 10, timeout_s=0) == 1
    dispatcher.finish(second)
    dispatcher.unreserve(queue, 1)
    assert dispatcher.reserve(queue, 10, timeout_s=0) == 2


def test_a_roomy_bound_grants_whole_batches_only():
    """With room for two batches or more, a partial grant would cost a whole receive for a
    few messages (0.17 receives per message measured at 10 ms handlers): wait for ten."""
    dispatcher = new_dispatcher(capacity=40)
    queue = make_queue("a")
    dispatcher.add_queue(queue)
    assert [dispatcher.reserve(queue, 10, timeout_s=0) for _ in range(4)] == [10] * 4
    dispatcher.submit(queue, [make_item(queue) for _ in range(40)])

    for _ in range(9):
        dispatcher.finish(take_now(dispatcher))
        assert dispatcher.reserve(queue, 10, timeout_s=0) == 0  # 1..9 free: not yet
    dispatcher.finish(take_now(dispatcher))
    assert dispatcher.reserve(queue, 10, timeout_s=0) == 10
    dispatcher.finish(take_now(dispatcher))
    assert dispatcher.reserve(queue, 1, timeout_s=0) == 1  # a batch of one is whole at once


def test_a_waiter_that_cannot_take_a_whole_batch_does_not_hold_up_the_line():
    """w waits for room for ten but its own share has only five free: when the total room
    comes back, y (whose share has ten free) must not queue behind it."""
    dispatcher = new_dispatcher(capacity=60)  # three queues: a share of 20 each
    w, x, y = make_queue("w"), make_queue("x"), make_queue("y")
    for queue in (w, x, y):
        dispatcher.add_queue(queue)
    fill(dispatcher, w, [make_item(w) for _ in range(15)])
    fill(dispatcher, x, [make_item(x) for _ in range(20)])
    while take_now(dispatcher) is not None:  # w's and x's items run
        pass
    fill(dispatcher, y, [make_item(y) for _ in range(20)])  # 55 of 60 held
    assert dispatcher.reserve(w, 10, timeout_s=0) == 0  # 5 free in total: w waits in line

    for _ in range(10):  # ten of y's finish: 15 free in total, 10 in y's share
        dispatcher.finish(take_now(dispatcher))

    assert dispatcher.reserve(y, 10, timeout_s=0) == 10


def test_unused_reservation_is_returned():
    dispatcher = new_dispatcher(capacity=10)
    queue = make_queue("a")
    dispatcher.add_queue(queue)
    assert dispatcher.reserve(queue, 10, timeout_s=0) == 10
    dispatcher.unreserve(queue, 7)  # the receive returned 3 messages
    assert dispatcher.reserve(queue, 10, timeout_s=0) == 7


def received(dispatcher: Dispatcher, queue, count: int) -> int:
    """One poll of `queue` that returned `count` messages (all it was granted if fewer)."""
    granted = dispatcher.reserve(queue, count, timeout_s=0)
    dispatcher.end_poll(queue, granted, received=min(granted, count))
    dispatcher.submit(queue, [make_item(queue) for _ in range(min(granted, count))])
    return min(granted, count)


def test_queues_with_work_share_the_bound_and_idle_ones_leave_theirs():
    """Max-min fair and work-conserving: one busy queue beside idle ones may use the whole
    bound; once another has work too, each is held to an equal share."""
    clock = FakeClock()
    dispatcher = new_dispatcher(capacity=40, clock=clock)
    deep, other, idle = make_queue("deep"), make_queue("other"), make_queue("idle")
    for queue in (deep, other, idle):
        dispatcher.add_queue(queue)
    assert [received(dispatcher, deep, 10) for _ in range(4)] == [10, 10, 10, 10]
    assert dispatcher.reserve(deep, 10, timeout_s=0) == 0  # the whole bound, no more

    while (item := take_now(dispatcher)) is not None:  # deep's work drains
        dispatcher.finish(item)
    assert received(dispatcher, deep, 10) == 10  # first in line
    assert received(dispatcher, other, 10) == 10  # other has work now: two active queues
    assert received(dispatcher, deep, 10) == 10
    # Nobody else asks for room: deep may take what is free beyond its share of 20.
    assert received(dispatcher, deep, 10) == 10
    assert dispatcher.reserve(other, 10, timeout_s=0) == 0  # full: other waits in line
    for _ in range(10):  # ten of deep's messages finish
        item = take_now(dispatcher)
        assert item is not None and item.queue is deep
        dispatcher.finish(item)
    # other is waiting: deep is held to its share, ceil(40 / 2) = 20, and the freed room
    # goes to other.
    assert dispatcher.reserve(deep, 10, timeout_s=0) == 0
    assert dispatcher.reserve(other, 10, timeout_s=0) == 10


def test_a_share_binds_only_while_another_queue_waits_for_room():
    """Work-conserving: queues that received a moment ago but ask for nothing now (a Zipf
    spread's small queues, just drained) do not hold the hot one to a share of the bound
    while workers idle. Before, 15 such queues held it to 10 messages in hand."""
    clock = FakeClock()
    dispatcher = new_dispatcher(capacity=150, clock=clock)
    hot, *small = [make_queue(f"q{i}") for i in range(16)]
    for queue in (hot, *small):
        dispatcher.add_queue(queue)
    for queue in small:  # each received one message, now handled: active for a while
        assert received(dispatcher, queue, 1) == 1
    while (item := take_now(dispatcher)) is not None:
        dispatcher.finish(item)
    clock.advance(0.5)  # still within the active window
    assert received(dispatcher, hot, 10) == 10
    assert received(dispatcher, hot, 10) == 10  # 20 in hand: beyond a 16th of 150
    assert sum(received(dispatcher, hot, 10) for _ in range(13)) == 130  # the whole bound
    assert dispatcher.reserve(hot, 10, timeout_s=0) == 0


def test_waiters_woken_by_freed_room_are_granted_in_turn():
    """Room freed while two queues wait: the first gets it and wakes the second. A waiter
    that had waited a while looked stale by its own entry's age; purged before it found
    its place, it went to the back, behind the one it should have woken, and both slept
    out their timeouts (the Zipf bench stalled with every poller blocked and room free)."""
    clock = FakeClock()
    dispatcher = new_dispatcher(capacity=20, clock=clock)
    hot, first, second = make_queue("hot"), make_queue("first"), make_queue("second")
    for queue in (hot, first, second):
        dispatcher.add_queue(queue)
    assert received(dispatcher, hot, 10) + received(dispatcher, hot, 10) == 20  # all of it
    grants: dict[str, int] = {}

    def wait_for_room(queue) -> None:
        grants[queue.name] = dispatcher.reserve(queue, 10, timeout_s=30, claims_total=True)

    threads = []
    try:
        for queue in (first, second):
            thread = threading.Thread(target=wait_for_room, args=(queue,), daemon=True)
            thread.start()
            threads.append(thread)
            wait_until(
                lambda q=queue: getattr(dispatcher._waiting.get(q.name), "waiting", 0) == 1,
                timeout_s=5,
                what=f"{queue.name} waiting for room",
            )
        clock.advance(1.0)  # both have waited a while
        while (item := take_now(dispatcher)) is not None:
            dispatcher.finish(item)
        for thread in threads:
            thread.join(timeout=5)
        assert grants == {"first": 10, "second": 10}
    finally:
        dispatcher.stop_receiving()  # never leave a thread blocked
        for thread in threads:
            thread.join(timeout=5)


def test_one_hot_queue_among_hundreds_of_idle_ones_can_fill_every_worker():
    """The defect: shares counted idle queues, so with 200 queues and 50 workers the hot
    queue could hold 10 messages and 40 workers idled."""
    dispatcher = new_dispatcher(capacity=150)  # pool_size 50 + queue_size 100
    hot, *idle = [make_queue(f"q{i}") for i in range(200)]
    for queue in (hot, *idle):
        dispatcher.add_queue(queue)
    for queue in idle:  # each idle queue has its long poll in flight
        assert dispatcher.reserve(queue, 10, timeout_s=0) == 10
    assert sum(received(dispatcher, hot, 10) for _ in range(15)) == 150
    started = [take_now(dispatcher) for _ in range(50)]
    assert all(item is not None for item in started)  # every worker busy


def test_idle_long_polls_on_many_queues_do_not_lock_each_other_out():
    dispatcher = new_dispatcher(capacity=12)  # pool_size 2 + queue_size 10
    queues = [make_queue(f"q{i}") for i in range(30)]
    for queue in queues:
        dispatcher.add_queue(queue)
    # Every queue may have a long poll in flight at once: a poll claims only its own share.
    assert [dispatcher.reserve(q, 10, timeout_s=0) for q in queues] == [10] * 30


def test_no_receive_starts_once_received_messages_fill_the_bound():
    dispatcher = new_dispatcher(capacity=12)
    busy, idle = make_queue("busy"), make_queue("idle")
    dispatcher.add_queue(busy)
    dispatcher.add_queue(idle)
    assert dispatcher.reserve(busy, 10, timeout_s=0) == 10
    dispatcher.submit(busy, [make_item(busy) for _ in range(10)])
    assert dispatcher.reserve(idle, 10, timeout_s=0) == 2  # what is left of the total
    dispatcher.submit(idle, [make_item(idle) for _ in range(2)])
    assert dispatcher.reserve(idle, 10, timeout_s=0) == 0
    assert dispatcher.reserve(busy, 10, timeout_s=0) == 0
    dispatcher.finish(take_now(dispatcher))
    assert dispatcher.reserve(idle, 10, timeout_s=0) == 1


# -- picking ------------------------------------------------------------------------------


def test_round_robin_a_deep_queue_does_not_starve_another():
    dispatcher = new_dispatcher(capacity=100)
    deep, small = make_queue("deep"), make_queue("small")
    for queue in (deep, small):
        dispatcher.add_queue(queue)
    fill(dispatcher, deep, [make_item(deep) for _ in range(40)])
    fill(dispatcher, small, [make_item(small) for _ in range(3)])

    order = []
    for _ in range(16):
        item = take_now(dispatcher)
        order.append(item.queue.name)
        dispatcher.finish(item)
    # A turn is one receive's worth (TURN_MESSAGES): small waits one turn of deep, no more.
    assert order == ["deep"] * TURN_MESSAGES + ["small"] * 3 + ["deep"] * 3


def test_a_receives_messages_start_together_so_their_deletes_can_share_a_batch():
    """Ten free workers and four queues of ten: the workers take one queue's ten, not a
    few of each, so they finish together and one DeleteMessageBatch carries them (one
    message per queue in turn averaged 1.8 deletes per batch at 50 ms handlers)."""
    dispatcher = new_dispatcher(capacity=100)
    queues = [make_queue(f"q{n}") for n in range(4)]
    for queue in queues:
        dispatcher.add_queue(queue)
        fill(dispatcher, queue, [make_item(queue) for _ in range(10)])

    first = [take_now(dispatcher) for _ in range(10)]  # ten workers, none finished yet
    assert {item.queue.name for item in first} == {"q0"}
    second = [take_now(dispatcher) for _ in range(10)]
    assert {item.queue.name for item in second} == {"q1"}


def test_a_turn_ends_early_when_its_queue_has_nothing_runnable():
    dispatcher = new_dispatcher(capacity=100)
    capped, other = make_queue("capped", max_concurrency=2), make_queue("other")
    for queue in (capped, other):
        dispatcher.add_queue(queue)
        fill(dispatcher, queue, [make_item(queue) for _ in range(5)])

    order = [take_now(dispatcher).queue.name for _ in range(4)]
    assert order == ["capped", "capped", "other", "other"]


def test_items_of_one_queue_start_in_received_order():
    dispatcher = new_dispatcher(capacity=10)
    queue = make_queue("a")
    dispatcher.add_queue(queue)
    items = fill(dispatcher, queue, [make_item(queue) for _ in range(5)])
    assert [take_now(dispatcher) for _ in range(5)] == items


def test_max_concurrency_caps_one_queue_without_blocking_others():
    dispatcher = new_dispatcher(capacity=100)
    capped, free = make_queue("capped", max_concurrency=2), make_queue("free")
    for queue in (capped, free):
        dispatcher.add_queue(queue)
    fill(dispatcher, capped, [make_item(capped) for _ in range(5)])
    fill(dispatcher, free, [make_item(free) for _ in range(5)])

    running = [take_now(dispatcher) for _ in range(7)]
    by_queue = [item.queue.name for item in running]
    assert by_queue.count("capped") == 2
    assert by_queue.count("free") == 5
    assert take_now(dispatcher) is None  # capped is at its limit, free is empty

    dispatcher.finish(next(i for i in running if i.queue is capped))
    assert take_now(dispatcher).queue is capped
    assert take_now(dispatcher) is None


def test_max_rate_is_a_token_bucket_on_the_clock():
    clock = FakeClock()
    dispatcher = new_dispatcher(capacity=100, clock=clock)
    limited = make_queue("limited", clock=clock, max_rate_per_s=2.0)
    other = make_queue("other")
    for queue in (limited, other):
        dispatcher.add_queue(queue)
    fill(dispatcher, limited, [make_item(limited) for _ in range(10)])

    def drain() -> int:
        started = 0
        while (item := take_now(dispatcher)) is not None:
            assert item.queue is limited
            dispatcher.finish(item)
            started += 1
        return started

    assert drain() == 2  # bursts to one second's worth
    clock.advance(0.25)
    assert drain() == 0
    clock.advance(0.26)
    assert drain() == 1
    clock.advance(10.0)  # a long pause does not bank more than the burst
    assert drain() == 2

    # The rate-limited queue does not hold the other queue back.
    fill(dispatcher, other, [make_item(other) for _ in range(3)])
    started = [take_now(dispatcher) for _ in range(3)]
    assert [i.queue.name for i in started] == ["other"] * 3


def test_rate_limited_take_waits_for_the_next_token():
    clock = FakeClock()
    dispatcher = new_dispatcher(capacity=10, clock=clock)
    queue = make_queue("a", clock=clock, max_rate_per_s=1.0)
    dispatcher.add_queue(queue)
    fill(dispatcher, queue, [make_item(queue) for _ in range(2)])
    assert take_now(dispatcher) is not None
    assert take_now(dispatcher) is None
    clock.advance(1.0)
    assert take_now(dispatcher) is not None


# -- FIFO ---------------------------------------------------------------------------------


def test_fifo_one_message_per_group_at_a_time_in_order_groups_in_parallel():
    dispatcher = new_dispatcher(capacity=20)
    queue = make_queue("work.fifo")
    dispatcher.add_queue(queue)
    g1 = [make_item(queue, group="g1") for _ in range(3)]
    g2 = [make_item(queue, group="g2") for _ in range(2)]
    fill(dispatcher, queue, [g1[0], g1[1], g2[0], g1[2], g2[1]])

    assert take_now(dispatcher) is g1[0]
    assert take_now(dispatcher) is g2[0]  # g1[1] waits for g1[0]; g2 runs beside it
    assert take_now(dispatcher) is None

    dispatcher.finish(g2[0])
    assert take_now(dispatcher) is g2[1]
    assert take_now(dispatcher) is None
    dispatcher.finish(g1[0])
    assert take_now(dispatcher) is g1[1]
    dispatcher.finish(g1[1])
    assert take_now(dispatcher) is g1[2]


def test_fifo_failure_releases_the_groups_later_messages_and_keeps_others():
    dispatcher = new_dispatcher(capacity=20)
    queue = make_queue("work.fifo")
    dispatcher.add_queue(queue)
    g1 = [make_item(queue, group="g1") for _ in range(3)]
    g2 = make_item(queue, group="g2")
    fill(dispatcher, queue, [g1[0], g1[1], g2, g1[2]])
    assert take_now(dispatcher) is g1[0]

    released = dispatcher.drop_group(queue, "g1")  # g1[0] failed

    assert released == [g1[1].deliveries[0], g1[2].deliveries[0]]
    assert all(d.state is DeliveryState.RELEASED for d in released)
    assert take_now(dispatcher) is g2
    dispatcher.finish(g1[0])
    dispatcher.finish(g2)
    assert take_now(dispatcher) is None
    assert dispatcher.is_queue_idle(queue)  # the released ones no longer hold room
    assert dispatcher.reserve(queue, 100, timeout_s=0) == 20


# -- draining -----------------------------------------------------------------------------


def test_stop_receiving_returns_queued_unstarted_and_refuses_more():
    dispatcher = new_dispatcher(capacity=20)
    a, b = make_queue("a"), make_queue("b")
    for queue in (a, b):
        dispatcher.add_queue(queue)
    a_items = fill(dispatcher, a, [make_item(a) for _ in range(3)])
    b_items = fill(dispatcher, b, [make_item(b) for _ in range(2)])
    running = take_now(dispatcher)
    assert running is a_items[0]

    released = dispatcher.stop_receiving()

    expected = [i.deliveries[0] for i in [*a_items[1:], *b_items]]
    assert sorted(released, key=id) == sorted(expected, key=id)
    assert all(d.state is DeliveryState.RELEASED for d in released)
    assert running.deliveries[0].state is DeliveryState.RUNNING
    assert take_now(dispatcher) is None
    assert dispatcher.reserve(a, 1, timeout_s=0) == 0
    assert not dispatcher.submit(a, [make_item(a)])
    assert dispatcher.held_deliveries() == [running.deliveries[0]]
    dispatcher.finish(running)
    assert dispatcher.is_queue_idle(a) and dispatcher.is_queue_idle(b)


def test_stop_queue_only_stops_that_queue():
    dispatcher = new_dispatcher(capacity=20)
    a, b = make_queue("a"), make_queue("b")
    for queue in (a, b):
        dispatcher.add_queue(queue)
    fill(dispatcher, a, [make_item(a) for _ in range(2)])
    b_items = fill(dispatcher, b, [make_item(b)])

    assert len(dispatcher.stop_queue(a)) == 2
    assert dispatcher.reserve(a, 1, timeout_s=0) == 0
    assert dispatcher.reserve(b, 1, timeout_s=0) == 1
    assert take_now(dispatcher) is b_items[0]


def test_settle_discards_expired_deliveries():
    dispatcher = new_dispatcher(capacity=5)
    queue = make_queue("a")
    dispatcher.add_queue(queue)
    items = fill(dispatcher, queue, [make_item(queue) for _ in range(2)])
    items[1].deliveries[0].is_expired = True
    kept = dispatcher.settle([i.deliveries[0] for i in items], DeliveryState.DONE)
    assert kept == [items[0].deliveries[0]]


def test_drop_expired_removes_queued_items_and_frees_their_room():
    dispatcher = new_dispatcher(capacity=3)
    queue = make_queue("a")
    dispatcher.add_queue(queue)
    items = fill(dispatcher, queue, [make_item(queue) for _ in range(3)])
    dispatcher.drop_expired([items[1].deliveries[0]])
    assert dispatcher.depth() == 2
    assert dispatcher.reserve(queue, 5, timeout_s=0) == 1
    assert [take_now(dispatcher), take_now(dispatcher)] == [items[0], items[2]]


def test_wait_until_idle_is_cut_short_by_abort():
    dispatcher = new_dispatcher(capacity=5)
    queue = make_queue("a")
    dispatcher.add_queue(queue)
    fill(dispatcher, queue, [make_item(queue)])
    item = take_now(dispatcher)
    abort = threading.Event()
    abort.set()
    assert not dispatcher.wait_until_idle(deadline_s=1e12, abort=abort)
    dispatcher.finish(item)
    assert dispatcher.wait_until_idle(deadline_s=0)


# -- invariants under random interleavings ------------------------------------------------

_ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["receive", "take", "finish", "fail", "stop_queue"]),
        st.integers(0, 2),  # which queue
        st.integers(1, 10),  # how many / which
    ),
    max_size=60,
)


class Model:
    """Drives a dispatcher like pollers and workers would, remembering FIFO orders."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.dispatcher = new_dispatcher(capacity=capacity)
        self.queues = [
            make_queue("plain"),
            make_queue("capped", max_concurrency=1),
            make_queue("work.fifo"),
        ]
        for queue in self.queues:
            self.dispatcher.add_queue(queue)
        self.sent: dict[str, list[str]] = {}  # group -> bodies in received order
        self.started: dict[str, list[str]] = {}
        self.running: list = []

    def receive(self, queue, n: int) -> None:
        granted = self.dispatcher.reserve(queue, n, timeout_s=0)
        groups = [f"g{k % 2}" if queue.info.is_fifo else None for k in range(granted)]
        items = [make_item(queue, group=g) for g in groups]
        for item in items:
            for group in item.groups:
                self.sent.setdefault(group, []).append(body_of(item))
        if not self.dispatcher.submit(queue, items):
            self.dispatcher.unreserve(queue, granted)

    def take(self) -> None:
        item = take_now(self.dispatcher)
        if item is None:
            return
        self.running.append(item)
        for group in item.groups:
            self.started.setdefault(group, []).append(body_of(item))

    def finish(self, n: int, *, failed: bool) -> None:
        if not self.running:
            return
        item = self.running.pop(n % len(self.running))
        if failed:
            for group in item.groups:
                for delivery in self.dispatcher.drop_group(item.queue, group):
                    self.sent[group].remove(delivery.message.body)  # comes back later
        self.dispatcher.finish(item)

    def check(self) -> None:
        held = sum(q.held for q in self.queues)
        assert 0 <= held <= self.capacity
        assert all(q.held >= 0 for q in self.queues)
        running_groups = [g for item in self.running for g in item.groups]
        assert len(running_groups) == len(set(running_groups)), "a group ran twice at once"
        assert sum(1 for item in self.running if item.queue is self.queues[1]) <= 1

    def check_order(self) -> None:
        for group, bodies in self.started.items():
            assert bodies == [b for b in self.sent[group] if b in bodies], f"{group} order"


@settings(max_examples=150, deadline=None)
@given(actions=_ACTIONS, capacity=st.integers(1, 15))
def test_random_interleavings_keep_the_bounds_and_fifo_order(actions, capacity):
    model = Model(capacity)
    for action, index, n in actions:
        queue = model.queues[index]
        if action == "receive":
            model.receive(queue, n)
        elif action == "take":
            model.take()
        elif action in ("finish", "fail"):
            model.finish(n, failed=action == "fail")
        elif index == 0:
            model.dispatcher.stop_queue(queue)
        model.check()
    model.check_order()


# -- global bounds and targeted waking -----------------------------------------------------


def sized_items(queue, count: int, size: int = 0) -> list:
    items = [make_item(queue) for _ in range(count)]
    for item in items:
        item.size_bytes = size
    return items


def test_a_fan_out_to_many_idle_long_polls_holds_at_most_queue_size_plus_one_receive():
    """The defect: each idle long poll claimed its own share, so 10 messages to each of
    1,000 idle queues left ~10,000 held for 10 workers."""
    dispatcher = Dispatcher(capacity=20, clock=FakeClock(), max_queued=10)  # pool 10, queue 10
    queues = [make_queue(f"q{i}") for i in range(100)]
    for queue in queues:
        dispatcher.add_queue(queue)
    assert all(dispatcher.reserve(q, 10, timeout_s=0) == 10 for q in queues)
    refused = 0
    for queue in queues:  # every poll returns ten at once
        dispatcher.end_poll(queue, 10, received=10)
        refused += len(dispatcher.submit_bounded(queue, sized_items(queue, 10)))
    assert dispatcher.depth() <= 10 + 10
    assert refused == 1000 - dispatcher.depth()


def test_room_freed_once_is_granted_once_to_receives_that_return_at_once():
    """Queues known to have work: every waiting poller woken by the same free room got it
    (the total counted only messages held, not receives in flight), and the first burst
    after a fan-out was received and released again by the thousand."""
    dispatcher = Dispatcher(capacity=20, clock=FakeClock(), max_queued=10)  # pool 10, queue 10
    queues = [make_queue(f"q{i}") for i in range(50)]
    for queue in queues:
        dispatcher.add_queue(queue)
    granted = [dispatcher.reserve(q, 10, timeout_s=0, claims_total=True) for q in queues]
    assert sum(granted) <= 20  # the bound, with nothing held yet
    for queue, room in zip(queues, granted, strict=True):
        if room:
            assert dispatcher.submit_bounded(queue, sized_items(queue, room)) == []
            dispatcher.end_poll(queue, room, received=room, claims_total=True)
    assert dispatcher.depth() == sum(granted)


def test_an_idle_long_poll_asks_for_its_part_of_the_bound_when_many_queues_could_answer():
    dispatcher = Dispatcher(capacity=110, clock=FakeClock(), max_queued=100)
    for i in range(1000):
        dispatcher.add_queue(make_queue(f"q{i}"))
    assert dispatcher.poll_size(10) == 1  # a fan-out to all 1,000 returns 1,000, not 10,000
    few = Dispatcher(capacity=110, clock=FakeClock(), max_queued=100)
    for i in range(8):
        few.add_queue(make_queue(f"q{i}"))
    assert few.poll_size(10) == 10


def test_received_messages_beyond_the_byte_budget_are_refused_but_one_always_fits():
    dispatcher = Dispatcher(capacity=100, clock=FakeClock(), max_held_bytes=1000)
    queue = make_queue("a")
    dispatcher.add_queue(queue)
    refused = dispatcher.submit_bounded(queue, sized_items(queue, 3, size=400))
    assert len(refused) == 1 and dispatcher.depth() == 2
    alone = Dispatcher(capacity=100, clock=FakeClock(), max_held_bytes=1000)
    big = make_queue("big")
    alone.add_queue(big)
    assert alone.submit_bounded(big, sized_items(big, 1, size=5000)) == []


def test_a_refused_fifo_tail_keeps_its_order():
    dispatcher = Dispatcher(capacity=100, clock=FakeClock(), max_queued=0)
    queue = make_queue("f.fifo")
    dispatcher.add_queue(queue)
    items = [make_item(queue, group="g") for _ in range(15)]
    refused = dispatcher.submit_bounded(queue, items)
    kept = [item.deliveries[0] for item in items[:10]]
    assert refused == [item.deliveries[0] for item in items[10:]]  # a suffix, in order
    assert [i.deliveries[0] for i in queue.queued] == kept


def test_freed_room_wakes_one_waiting_queue_not_every_poller():
    dispatcher = new_dispatcher(capacity=10)
    busy = make_queue("busy")
    waiting = [make_queue(f"w{i}") for i in range(20)]
    for queue in (busy, *waiting):
        dispatcher.add_queue(queue)
    fill(dispatcher, busy, [make_item(busy) for _ in range(10)])
    for queue in waiting:
        assert dispatcher.reserve(queue, 1, timeout_s=0) == 0  # in line for room
    woken: list[str] = []
    for name, waiter in dispatcher._waiting.items():
        waiter.waiting = 1  # as if blocked in reserve (a head not blocked has nobody to wake)
        waiter.cond.notify_all = lambda name=name: woken.append(name)  # type: ignore[method-assign]
    dispatcher.finish(take_now(dispatcher))
    assert woken == ["w0"]  # the first in line, which wakes the next if room is left


def test_a_waiter_that_went_away_does_not_hold_freed_room_from_the_line():
    """A poller at the head of the line that stopped asking (held back by the acks, say)
    kept freed room from everyone behind it for seconds; now it loses its place."""
    clock = FakeClock()
    dispatcher = new_dispatcher(capacity=20, clock=clock)
    busy, away, other = make_queue("busy"), make_queue("away"), make_queue("other")
    for queue in (busy, away, other):
        dispatcher.add_queue(queue)
    fill(dispatcher, busy, [make_item(busy) for _ in range(20)])
    assert dispatcher.reserve(away, 10, timeout_s=0) == 0  # first in line, then goes away
    clock.advance(0.5)
    for _ in range(10):
        dispatcher.finish(take_now(dispatcher))
    assert dispatcher.reserve(other, 10, timeout_s=0) == 10


def test_counts_by_queue_reads_running_and_queued_messages_of_every_queue_at_once():
    dispatcher = new_dispatcher(capacity=100)
    a, b, idle = make_queue("a"), make_queue("b"), make_queue("idle")
    for queue in (a, b, idle):
        dispatcher.add_queue(queue)
    fill(dispatcher, a, [make_item(a) for _ in range(3)])
    fill(dispatcher, b, [make_item(b) for _ in range(2)])
    started = [take_now(dispatcher) for _ in range(4)]  # a's turn: its three, then one of b

    assert [item.queue.name for item in started] == ["a", "a", "a", "b"]
    assert dispatcher.counts_by_queue([a, b, idle]) == {
        "a": (3, 0),
        "b": (1, 1),
        "idle": (0, 0),
    }
