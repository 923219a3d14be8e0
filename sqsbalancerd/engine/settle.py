"""Turn a handler call's outcome into exactly one visibility decision per receipt.

Succeeded → delete. Failed → visible again after the backoff. On FIFO queues a failed
message is retried in process while its group-mates stay held (and extended): they have not
run, so they are not failures, get no backoff and gain no receive count. Once the failed
message has had as many attempts as the queue's redrive policy allows, it is handed back to
SQS and received alone until the redrive policy moves it to the dead-letter queue.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

from sqsbalancerd.clock import Clock
from sqsbalancerd.engine.acks import Acknowledger, extension_lead_s
from sqsbalancerd.engine.dispatch import Dispatcher
from sqsbalancerd.engine.state import (
    Delivery,
    DeliveryState,
    QueueRuntime,
    WorkItem,
    size_of,
)
from sqsbalancerd.stats import Stats

logger = logging.getLogger(__name__)

# An in-process retry must leave this much of the extension budget after its backoff.
RETRY_BUDGET_MARGIN_S = 10.0


class Settler:
    def __init__(
        self, *, dispatcher: Dispatcher, acks: Acknowledger, stats: Stats, clock: Clock
    ) -> None:
        self._dispatcher = dispatcher
        self._acks = acks
        self._stats = stats
        self._clock = clock

    def settle(self, item: WorkItem, failures: set[str], retry_after: dict[str, float]) -> None:
        if item.queue.info.is_fifo and failures:
            self._settle_fifo(item, failures, retry_after)
            return
        if not failures:  # the usual case: one pass, no lookups, no empty "failed" round
            self._delete(item.queue, item.deliveries)
            return
        succeeded = [d for d in item.deliveries if d.message.message_id not in failures]
        failed = [d for d in item.deliveries if d.message.message_id in failures]
        self._delete(item.queue, succeeded)
        for delivery in self._keep(item.queue, failed):
            self._stats.count(item.queue.name, "failed")
            self._retry(delivery, retry_after.get(delivery.message.message_id))

    def time_out(self, item: WorkItem, *, why: str) -> None:
        """A call past its deadline (or abandoned on drain) that cannot be killed: its result
        is discarded and its messages are released now, not left to expire."""
        item.is_timed_out = True
        live = [d for d in item.deliveries if d.is_undecided]
        for delivery in live:
            delivery.is_expired = True  # its slot counts as stuck until the call returns
        self._release(live)
        for group in item.groups:  # the group's next messages must not run before it
            self._release_held_back(item.queue, self._dispatcher.drop_group(item.queue, group))
        logger.warning(
            why,
            extra={
                "queue": item.queue.name,
                "message_id": item.deliveries[0].message.message_id,
                "count": len(item.deliveries),
            },
        )

    def lapsed(self, delivery: Delivery) -> None:
        """A held message's visibility ran out before its extension: this copy must not run
        (SQS may hand it out again), and on FIFO its group's held messages go back with it
        so that they come back after it, in order."""
        if delivery.state is DeliveryState.QUEUED:
            self._dispatcher.drop_expired([delivery])
        group = delivery.message.group_id
        if delivery.queue.info.is_fifo and group is not None:
            held = self._dispatcher.drop_group(delivery.queue, group)
            self._release_held_back(delivery.queue, [d for d in held if d.is_undecided])

    def extension_failed(self, delivery: Delivery, now_s: float) -> None:
        """Its extension failed (and is retried early). A message not started yet, whose
        visibility is half way through the extension lead, is dropped and released now:
        if it ran, SQS might hand it out again meanwhile and both copies would run."""
        if delivery.state is not DeliveryState.QUEUED or not delivery.is_undecided:
            return
        lead_s = extension_lead_s(delivery.queue.policy.visibility_timeout_s)
        if delivery.visible_until_s - now_s > lead_s / 2:
            return
        dropped = self._dispatcher.drop_expired([delivery])
        group = delivery.message.group_id
        if delivery.queue.info.is_fifo and group is not None:  # its group comes back after it
            dropped += self._dispatcher.drop_group(delivery.queue, group)
        released = [d for d in dropped if d.is_undecided]
        logger.warning(
            "extension keeps failing; released an unstarted message before it could expire",
            extra={
                "queue": delivery.queue.name,
                "message_id": delivery.message.message_id,
                "count": len(released),
            },
        )
        self._release(released)

    # -- FIFO -----------------------------------------------------------------------------

    def _settle_fifo(
        self, item: WorkItem, failures: set[str], retry_after: dict[str, float]
    ) -> None:
        queue = item.queue
        succeeded, chains = fifo_chains(item.deliveries, failures)
        self._delete(queue, succeeded)
        for chain in chains:
            reported = sum(d.message.message_id in failures for d in chain)
            self._stats.count(queue.name, "failed", reported)
            self._stats.count(queue.name, "held_back", len(chain) - reported)
            head = chain[0]
            explicit = retry_after.get(head.message.message_id)
            if head.is_expired:  # past max_extension: it reappears on its own
                self._release_held_back(queue, [d for d in chain[1:] if d.is_undecided])
            elif not self._retry_in_process(chain, explicit):
                self._hand_back(chain, explicit)
            group = head.message.group_id
            if group is not None and not self._dispatcher.has_queued_retry(queue, group):
                self._release_held_back(queue, self._dispatcher.drop_group(queue, group))

    def _retry_in_process(self, chain: list[Delivery], explicit_after_s: float | None) -> bool:
        head = chain[0]
        queue = head.queue
        policy = queue.policy
        delay_s = explicit_after_s
        if delay_s is None:
            delay_s = policy.retry.delay_s(head.message.attempt)
        if delay_s is None or self._is_exhausted(head):
            return False
        now = self._clock.monotonic()
        budget_s = head.received_at_s + policy.max_extension_s - now
        if budget_s < delay_s + RETRY_BUDGET_MARGIN_S:
            return False
        for delivery in chain:
            message = delivery.message
            delivery.message = dataclasses.replace(message, attempt=message.attempt + 1)
        groups = frozenset(d.message.group_id for d in chain if d.message.group_id)
        # Its bytes are held again while it waits: the budget must count them.
        size = sum(size_of(d) for d in chain)
        retry = WorkItem(queue, tuple(chain), groups, not_before_s=now + delay_s, size_bytes=size)
        if not self._dispatcher.requeue(retry):
            return False  # the queue is being released: hand it back instead
        self._stats.count(queue.name, "retried")
        logger.info(
            "retrying a FIFO message in process; its group waits",
            extra={
                "queue": queue.name,
                "message_id": head.message.message_id,
                "attempt": head.message.attempt,
                "delay_s": delay_s,
            },
        )
        return True

    def _is_exhausted(self, head: Delivery) -> bool:
        limit = head.queue.policy.max_receive_count
        return limit is not None and head.message.attempt >= limit

    def _hand_back(self, chain: list[Delivery], explicit_after_s: float | None) -> None:
        """No in-process retry: the failed message goes back to SQS with its backoff (or
        at once, received alone until redriven, when its attempts are spent)."""
        head = chain[0]
        for delivery in chain:
            delivery.state = DeliveryState.DONE
        if self._is_exhausted(head):
            head.queue.mark_exhausted(head.message.message_id, self._clock.monotonic())
            self._release([head])
        else:
            self._retry(head, explicit_after_s)
        self._release([d for d in chain[1:] if d.is_undecided])

    def _release_held_back(self, queue: QueueRuntime, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            self._stats.count(queue.name, "held_back", len(deliveries))
            self._release(deliveries)

    # -- decisions ------------------------------------------------------------------------

    def _keep(self, queue: QueueRuntime, deliveries: Iterable[Delivery]) -> list[Delivery]:
        listed = list(deliveries)
        kept = self._dispatcher.settle(listed, DeliveryState.DONE)
        if len(kept) < len(listed):
            logger.warning(
                "handler returned after its messages were given up; result discarded",
                extra={"queue": queue.name, "count": len(listed) - len(kept)},
            )
        return kept

    def _delete(self, queue: QueueRuntime, deliveries: Iterable[Delivery]) -> None:
        kept = self._keep(queue, deliveries)
        if kept:
            self._stats.count(queue.name, "succeeded", len(kept))
            self._acks.delete(kept)

    def _retry(self, delivery: Delivery, explicit_after_s: float | None) -> None:
        queue = delivery.queue
        delay_s = (
            explicit_after_s
            if explicit_after_s is not None
            else queue.policy.retry.delay_s(delivery.message.attempt)
        )
        if delay_s is None:
            return  # backoff "none": it reappears when its visibility timeout runs out
        self._stats.count(queue.name, "retried")
        self._acks.change_visibility([delivery], round(delay_s), reason="retry")

    def _release(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            self._acks.change_visibility(deliveries, 0, reason="release")


def fifo_chains(
    deliveries: Iterable[Delivery], failures: set[str]
) -> tuple[list[Delivery], list[list[Delivery]]]:
    """(succeeded, chains): each chain is a group's first failure and everything of that
    group after it, in order; on FIFO queues all of a chain waits for its head."""
    succeeded: list[Delivery] = []
    chains: dict[str | None, list[Delivery]] = {}
    for delivery in deliveries:
        group = delivery.message.group_id
        if group in chains:
            chains[group].append(delivery)
        elif delivery.message.message_id in failures:
            chains[group] = [delivery]
        else:
            succeeded.append(delivery)
    return succeeded, list(chains.values())
