"""Discovery end to end: new queues are picked up; others and dead-letter queues are left alone."""

from __future__ import annotations

import pytest
from support import json_log, queue_depth, read_events, wait_until

from sqsbalancerd.local import create_queues, send_messages

pytestmark = pytest.mark.e2e

CONFIG = """
coordination.mode = "standalone"
handler = "handlers:record"
[discovery]
queue_pattern = "^work-"
interval = 1
[sqs]
wait_time_seconds = 1
[observability]
http_port = 0
log_format = "json"
"""


def handled(daemons, queue: str) -> int:
    return sum(
        1
        for e in read_events(daemons.events_path)
        if e["event"] == "end" and e["outcome"] == "ok" and e["queue"] == queue
    )


def test_new_queue_consumed_other_and_dead_letter_queues_untouched(sqs, daemons):
    urls = create_queues(sqs, ["work-a"])  # and work-a-dlq: its redrive target, matching too
    urls["work-a-dlq"] = sqs.get_queue_url(QueueName="work-a-dlq")["QueueUrl"]
    urls.update(create_queues(sqs, ["other-q"], dead_letter=False))
    for url in urls.values():
        send_messages(sqs, url, [f"m{n}" for n in range(3)])
    daemon = daemons.start(config=CONFIG)
    wait_until(lambda: handled(daemons, "work-a") == 3, timeout_s=30, what="work-a handled")

    urls.update(create_queues(sqs, ["work-new"], dead_letter=False))
    send_messages(sqs, urls["work-new"], [f"n{n}" for n in range(3)])
    wait_until(
        lambda: handled(daemons, "work-new") == 3,
        timeout_s=30,
        what="the queue created while running handled",
    )

    daemon.terminate()
    assert daemon.wait(timeout_s=30) == 0, daemon.log()
    events = read_events(daemons.events_path)
    assert {e["queue"] for e in events} == {"work-a", "work-new"}
    consumed = {
        line["queue"] for line in json_log(daemon.log()) if line["msg"] == "consuming queue"
    }
    assert consumed == {"work-a", "work-new"}
    assert queue_depth(sqs, urls["other-q"]) == (3, 0)
    assert queue_depth(sqs, urls["work-a-dlq"]) == (3, 0)
    assert queue_depth(sqs, urls["work-a"]) == (0, 0)
    assert queue_depth(sqs, urls["work-new"]) == (0, 0)
