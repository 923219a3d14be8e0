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

from enginekit import standalone_settings
from support import queue_depth, wait_until

from sqsbalancerd.clock import SystemClock
from sqsbalancerd.discovery import QueueInfo
from sqsbalancerd.engine.consumer import Engine, HandlerSet
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
            return len(handled) >= 400

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
