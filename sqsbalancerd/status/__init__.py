"""Render what discovery and the coordination table say, for people (rich) and scripts (JSON).

`status` reads the table and, by default, only the queue *names* (ListQueues, one call per
1,000): at 10,000 queues that is ten SQS calls, not ten thousand. A listed queue without an
ownership row is either waiting to be claimed or a dead-letter queue (never claimed): one
ListDeadLetterSourceQueues per such queue tells them apart, so that a settled cluster costs
one call per dead-letter queue, made once per listing. Per-queue attributes (depth, redrive
policy: one GetQueueAttributes per queue, concurrent) only with `--details`.
"""

from sqsbalancerd.status.read import (
    DEAD_LETTER_CHECK_MAX,
    QueueSource,
    StatusReader,
    read_report,
    watch,
)
from sqsbalancerd.status.render import render_discovery, render_status
from sqsbalancerd.status.report import (
    InstanceView,
    QueueSnapshot,
    QueueView,
    StatusReport,
    warnings_for,
)

__all__ = [
    "DEAD_LETTER_CHECK_MAX",
    "InstanceView",
    "QueueSnapshot",
    "QueueSource",
    "QueueView",
    "StatusReader",
    "StatusReport",
    "read_report",
    "render_discovery",
    "render_status",
    "warnings_for",
    "watch",
]
