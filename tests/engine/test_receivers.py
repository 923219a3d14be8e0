"""A hot queue gets several receivers while its receives come back full; idle queues one.

moto's ReceiveMessage takes no lock, so two concurrent receives of one queue can return the
same message. The engine merges such a copy into the held one while it is still ours (as it
would a redelivery); a copy that arrives after the first was handled and deleted runs again,
which SQS itself never does for a message in flight. The test allows that emulator artifact
(a few per thousand on a loaded machine) and counts it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from enginekit import CallLog, Rig, standalone_settings
from enginekit import make_queue as make_runtime
from support import FakeClock, queue_depth, wait_until

from sqsbalancerd.clock import SystemClock
from sqsbalancerd.discovery import QueueInfo
from sqsbalancerd.engine.consumer import Engine, HandlerSet
from sqsbalancerd.engine.poller import Poller
from sqsbalancerd.handler import ResolvedHandler
from sqsbalancerd.message import Message
from sqsbalancerd.runtime import ThreadSupervisor
from sqsbalancerd.stats import Stats


def make_queue(sqs: Any, name: str) -> QueueInfo:
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    return QueueInfo(name=name, url=url, visibility_timeout_s=30)


def test_a_hot_queue_gets_more_receivers_and_gives_them_up_when_it_cools(moto_sqs):
    handled: list[str] = []
    lock = threading.Lock()

    def handler(message: Message) -> None:
        time.sleep(0.02)
        with lock:
            handled.append(message.message_id)

    settings = standalone_settings(
        sqs={"wait_time_seconds": 1}, workers={"pool_size": 40, "queue_size": 100}
    )
    resolved = ResolvedHandler(path="t:h", function=handler, is_async=False, is_batch=False)
    supervisor = ThreadSupervisor()
    engine = Engine(
        sqs=moto_sqs,
        settings=settings,
        handlers=HandlerSet(default=resolved, by_path={}),
        stats=Stats(),
        clock=SystemClock(),
        spawner=supervisor,
    )
    hot, idle = make_queue(moto_sqs, "work-hot"), make_queue(moto_sqs, "work-idle")
    for start in range(0, 400, 10):
        entries = [{"Id": str(i), "MessageBody": f"m{start + i}"} for i in range(10)]
        moto_sqs.send_message_batch(QueueUrl=hot.url, Entries=entries)
    engine.start()
    try:
        engine.set_owned([hot, idle])
        most: dict[str, int] = {"work-hot": 0, "work-idle": 0}

        def drained() -> bool:
            for name in most:
                most[name] = max(most[name], len(engine._owned[name].receivers.pollers))
            with lock:  # moto's duplicates (see above) must not count for missing ones
                return len(set(handled)) >= 400

        wait_until(drained, timeout_s=60, every_s=0.05, what="400 messages handled")
        assert most["work-hot"] > 1  # more receivers while every receive came back full
        assert most["work-idle"] == 1  # an idle queue keeps exactly one long poll

        def extras_gone() -> bool:
            engine._scale_receivers()  # also drops the receivers that ended
            return len(engine._owned["work-hot"].receivers.pollers) == 1

        wait_until(extras_gone, timeout_s=10, what="the extra receivers to leave")
        runs = Counter(handled)
        assert len(runs) == 400  # every message handled
        twice = sum(n - 1 for n in runs.values())
        assert twice <= 4, f"{twice} messages handled twice"
        wait_until(lambda: queue_depth(moto_sqs, hot.url) == (0, 0), timeout_s=10)
    finally:
        engine.stop_receiving()
        engine.stop(timeout_s=5)
        assert supervisor.stop_all(timeout_s=10) == []


def test_an_extra_receiver_of_a_hot_queue_among_many_idle_ones_receives_full_batches(moto_sqs):
    """The defect: a new extra receiver started out "idle", so with 200 owned queues it
    asked for its part of the bound (150 // 200 -> 1 message) in a 20 s long poll, came back
    not full and left at once: the hot queue among 200 idle kept two receivers where alone
    it got five (stand-in SQS: 0.87x its rate alone)."""
    rig = Rig(moto_sqs, capacity=150, clock=FakeClock(), wait_time_s=20)
    for index in range(199):  # idle neighbours, each owned
        rig.dispatcher.add_queue(make_runtime(f"idle-{index}"))
    log = CallLog(moto_sqs)
    rig.send(*[f"m{n}" for n in range(30)])
    extra = Poller(
        rig.queue,
        sqs=moto_sqs,
        dispatcher=rig.dispatcher,
        acks=rig.acks,
        gate=rig.gate,
        stats=rig.stats,
        clock=rig.clock,
        on_gone=rig.gone.append,
        is_extra=True,
    )

    assert extra.run_once() == 0.0
    [params] = log.of("ReceiveMessage")
    assert (params["MaxNumberOfMessages"], params["WaitTimeSeconds"]) == (10, 1)
    assert extra.was_full  # so it stays while the queue is hot


def test_an_idle_queues_first_poll_still_asks_for_its_part_of_the_bound(moto_sqs):
    """What the fix keeps: the first (idle) poller of each queue asks for its part of the
    bound, so a fan-out to many idle queues does not receive ten each."""
    rig = Rig(moto_sqs, capacity=150, clock=FakeClock(), wait_time_s=1)
    for index in range(199):
        rig.dispatcher.add_queue(make_runtime(f"idle-{index}"))
    log = CallLog(moto_sqs)
    rig.send(*[f"m{n}" for n in range(30)])
    assert rig.receive() == 1
    assert [p["MaxNumberOfMessages"] for p in log.of("ReceiveMessage")] == [1]
