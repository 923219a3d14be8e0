"""Find the queues to consume: ListQueues (paginated) filtered by regex, plus named queues.

Telling a dead-letter queue apart takes every candidate's RedrivePolicy: one
GetQueueAttributes per queue. Those calls run concurrently (`attribute_concurrency` at
once) and their answers are cached across refreshes. A refresh lists the queues (one call
per 1,000), fetches the new ones, and re-reads only a slice of the cached ones (the least
recently read, so that each is read again within `attribute_max_age`): a redrive policy
changes rarely, and reading all of them every interval would cost one call per queue.

Bound for the first discovery, which an instance finishes before it joins:
ceil(N / 1000) sequential ListQueues plus ceil(N / attribute_concurrency) rounds of
GetQueueAttributes; at 10,000 queues, 16 at once and 20 ms a call on AWS, about 10 + 625
calls deep, ~13 s. Later refreshes: the list, the new queues and
ceil(N · interval / attribute_max_age) re-reads (10,000 · 300 / 3600 = 834, 53 rounds).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from sqsbalancerd.aws import describe_error, error_code
from sqsbalancerd.clock import Clock, SystemClock
from sqsbalancerd.config import DiscoverySettings
from sqsbalancerd.errors import QueueNotFoundError
from sqsbalancerd.runtime import map_bounded

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

logger = logging.getLogger(__name__)

LIST_PAGE_SIZE = 1000
_QUEUE_MISSING = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
_REGEX_SPECIAL = set(".^$*+?{}[]\\|()")


@dataclass(frozen=True, slots=True)
class QueueInfo:
    name: str
    url: str
    arn: str | None = None
    is_fifo: bool = False
    visibility_timeout_s: int = 30
    dead_letter_target_arn: str | None = None
    max_receive_count: int | None = None  # the redrive policy's, when it has one
    # Depth when the attributes were read (`status --details`); stale once cached.
    approximate_messages: int | None = None
    approximate_messages_in_flight: int | None = None

    @property
    def has_redrive_policy(self) -> bool:
        return self.dead_letter_target_arn is not None


@dataclass(frozen=True, slots=True)
class SkippedQueue:
    name: str
    url: str
    reason: str


@dataclass(frozen=True, slots=True)
class DiscoveryResult:
    matched: tuple[QueueInfo, ...]
    skipped: tuple[SkippedQueue, ...]
    # GetQueueAttributes calls this refresh made (new queues plus the rotation's slice).
    attribute_fetches: int = 0

    @property
    def names(self) -> frozenset[str]:
        return frozenset(q.name for q in self.matched)


def queue_name_from_url(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def literal_prefix(pattern: str | None) -> str | None:
    """The literal text a `^prefix...` pattern requires, usable as QueueNamePrefix."""
    if not pattern or not pattern.startswith("^") or "|" in pattern:
        return None
    prefix: list[str] = []
    for char in pattern[1:]:
        if char in _REGEX_SPECIAL:
            if char in "?*{" and prefix:
                prefix.pop()  # the previous character is optional
            break
        prefix.append(char)
    return "".join(prefix) or None


@dataclass(frozen=True, slots=True)
class _Cached:
    info: QueueInfo
    read_at_s: float  # monotonic


class Discovery:
    def __init__(
        self, sqs: SQSClient, settings: DiscoverySettings, *, clock: Clock | None = None
    ) -> None:
        self._sqs = sqs
        self._settings = settings
        self._clock = clock or SystemClock()
        self._include = re.compile(settings.queue_pattern) if settings.queue_pattern else None
        self._exclude = re.compile(settings.exclude_pattern) if settings.exclude_pattern else None
        self._cache: dict[str, _Cached] = {}

    @property
    def skips_dead_letter_queues(self) -> bool:
        return not self._settings.include_dead_letter_queues

    def discover(self, *, strict: bool = False) -> DiscoveryResult:
        """One refresh. `strict` turns a missing named queue into QueueNotFoundError."""
        return self.classify(self.candidates(strict=strict), strict=strict)

    def candidates(self, *, strict: bool = False) -> dict[str, str]:
        """The listed and named queue URLs, each with why it is one: no attribute read."""
        candidates: dict[str, str] = {}  # url -> why it is a candidate
        if self._include is not None:
            for url in self._list_urls():
                candidates[url] = "pattern"
        for url in self._named_queue_urls(strict=strict):
            candidates[url] = "named"
        return candidates

    def filter_reason(self, name: str, origin: str) -> str | None:
        """Why a listed queue is not consumed, judged by its name alone (None: it may be)."""
        if origin == "named":
            return None
        if self._include is not None and not self._include.search(name):
            return "does not match queue_pattern"
        if self._exclude is not None and self._exclude.search(name):
            return "matches exclude_pattern"
        return None

    def classify(self, candidates: dict[str, str], *, strict: bool = False) -> DiscoveryResult:
        """Filter `candidates` (from `candidates()`) and tell dead-letter queues apart."""
        skipped: list[SkippedQueue] = []
        wanted: dict[str, str] = {}
        for url, origin in sorted(candidates.items()):
            name = queue_name_from_url(url)
            reason = self.filter_reason(name, origin)
            if reason:
                skipped.append(SkippedQueue(name, url, reason))
            else:
                wanted[url] = origin
        infos, fetches = self._infos(list(wanted))
        for url, origin in wanted.items():
            if url not in infos and origin == "named":  # by URL: only now do we know
                _named_queue_missing(url, strict=strict)
        matched, dead_letter = self._split_dead_letter(list(infos.values()))
        return DiscoveryResult(
            tuple(matched), tuple(sorted(skipped + dead_letter, key=lambda s: s.name)), fetches
        )

    def _split_dead_letter(
        self, infos: list[QueueInfo]
    ) -> tuple[list[QueueInfo], list[SkippedQueue]]:
        if self._settings.include_dead_letter_queues:
            return infos, []
        dlq_arns = {i.dead_letter_target_arn for i in infos if i.dead_letter_target_arn}
        matched = [i for i in infos if i.arn not in dlq_arns]
        skipped = [
            SkippedQueue(i.name, i.url, "dead-letter queue of another")
            for i in infos
            if i.arn in dlq_arns
        ]
        return matched, skipped

    def _infos(self, urls: list[str]) -> tuple[dict[str, QueueInfo], int]:
        """Attributes of `urls` (sorted), from the cache where fresh enough; deleted queues
        are left out. Returns them with the number of GetQueueAttributes calls made."""
        present = set(urls)
        for url in [u for u in self._cache if u not in present]:
            del self._cache[url]
        due = [u for u in urls if u not in self._cache] + self._rotation()
        if due:
            map_bounded(
                self._refresh,
                due,
                max_workers=self._settings.attribute_concurrency,
                name="sqsb-discovery",
            )
        return {u: self._cache[u].info for u in urls if u in self._cache}, len(due)

    def _rotation(self) -> list[str]:
        """The cached queues to read again: the least recently read, enough per refresh
        that each is read within `attribute_max_age`, plus any older than that."""
        if not self._cache:
            return []
        max_age_s = self._settings.attribute_max_age
        oldest_first = self._clock.monotonic() - max_age_s
        quota = math.ceil(len(self._cache) * min(1.0, self._settings.interval / max_age_s))
        oldest = sorted(self._cache, key=lambda url: (self._cache[url].read_at_s, url))
        stale = sum(1 for url in oldest if self._cache[url].read_at_s <= oldest_first)
        return oldest[: max(quota, stale)]

    def _refresh(self, url: str) -> None:
        """Read one queue's attributes into the cache (a thread of the bounded pool): what is
        read stays cached even if another read of this refresh fails."""
        read_at_s = self._clock.monotonic()
        info = self._fetch(url)
        if info is None:
            self._cache.pop(url, None)
        else:
            self._cache[url] = _Cached(info, read_at_s)

    def _list_urls(self) -> Iterable[str]:
        kwargs: dict[str, Any] = {"MaxResults": LIST_PAGE_SIZE}
        prefix = literal_prefix(self._settings.queue_pattern)
        if prefix:
            kwargs["QueueNamePrefix"] = prefix
        while True:
            page = self._sqs.list_queues(**kwargs)
            yield from page.get("QueueUrls", [])
            token = page.get("NextToken")
            if not token:
                return
            kwargs["NextToken"] = token

    def dead_letter_sources(self, urls: list[str]) -> dict[str, frozenset[str] | None]:
        """For each URL, the names of the queues whose redrive policy targets it (one
        ListDeadLetterSourceQueues per 1,000 sources), concurrently; None where the call
        failed (a role without sqs:ListDeadLetterSourceQueues, a timeout)."""
        found = map_bounded(
            self._sources_of,
            urls,
            max_workers=self._settings.attribute_concurrency,
            name="sqsb-discovery",
        )
        return dict(zip(urls, found, strict=True))

    def _sources_of(self, url: str) -> frozenset[str] | None:
        kwargs: dict[str, Any] = {"QueueUrl": url, "MaxResults": LIST_PAGE_SIZE}
        names: set[str] = set()
        try:
            while True:
                page = self._sqs.list_dead_letter_source_queues(**kwargs)
                names.update(queue_name_from_url(u) for u in page.get("queueUrls", []))
                token = page.get("NextToken")
                if not token:
                    return frozenset(names)
                kwargs["NextToken"] = token
        except (ClientError, BotoCoreError) as exc:  # unknown, not fatal: status says so
            logger.debug("dead-letter sources unread", extra={"error": describe_error(exc)})
            return None

    def _named_queue_urls(self, *, strict: bool) -> Iterable[str]:
        for entry in self._settings.queues:
            if entry.startswith(("https://", "http://")):
                yield entry
                continue
            try:
                yield self._sqs.get_queue_url(QueueName=entry)["QueueUrl"]
            except ClientError as exc:
                if error_code(exc) not in _QUEUE_MISSING:
                    raise
                _named_queue_missing(entry, strict=strict)

    def _fetch(self, url: str) -> QueueInfo | None:
        try:
            attributes = self._sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
        except ClientError as exc:
            if error_code(exc) in _QUEUE_MISSING:
                return None  # deleted between listing and now
            raise
        raw: Mapping[str, str] = attributes.get("Attributes", {})  # type: ignore[assignment]
        return _info_from_attributes(url, raw)


def _named_queue_missing(entry: str, *, strict: bool) -> None:
    if strict:
        raise QueueNotFoundError(f'discovery.queues: queue "{entry}" does not exist') from None
    logger.warning("named queue missing", extra={"queue": entry})


def _redrive(attributes: Mapping[str, str]) -> tuple[str | None, int | None]:
    """(dead-letter target ARN, maxReceiveCount) of the queue's redrive policy, if any."""
    try:
        policy = json.loads(attributes.get("RedrivePolicy") or "{}")
        count = policy.get("maxReceiveCount")
        return policy.get("deadLetterTargetArn"), int(count) if count is not None else None
    except (ValueError, AttributeError, TypeError):
        return None, None


def _info_from_attributes(url: str, attributes: Mapping[str, str]) -> QueueInfo:
    target, max_receive_count = _redrive(attributes)
    name = queue_name_from_url(url)
    return QueueInfo(
        name=name,
        url=url,
        arn=attributes.get("QueueArn"),
        is_fifo=attributes.get("FifoQueue") == "true" or name.endswith(".fifo"),
        visibility_timeout_s=int(attributes.get("VisibilityTimeout", "30")),
        dead_letter_target_arn=target,
        max_receive_count=max_receive_count,
        approximate_messages=_count(attributes.get("ApproximateNumberOfMessages")),
        approximate_messages_in_flight=_count(
            attributes.get("ApproximateNumberOfMessagesNotVisible")
        ),
    )


def _count(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


class DiscoveryLoop:
    """Refresh every `interval` seconds and hand each result on."""

    def __init__(
        self,
        discovery: Discovery,
        *,
        interval_s: float,
        on_result: Callable[[DiscoveryResult], None],
        clock: Clock | None = None,
    ) -> None:
        self._discovery = discovery
        self._clock = clock or SystemClock()
        self._interval_s = interval_s
        self._on_result = on_result
        self._known: frozenset[str] = frozenset()

    def run_once(self, *, strict: bool = False) -> DiscoveryResult:
        started_s = self._clock.monotonic()
        result = self._discovery.discover(strict=strict)
        added, removed = result.names - self._known, self._known - result.names
        if added or removed:
            logger.info(
                "queues discovered",
                extra={
                    "count": len(result.matched),
                    "added": len(added),
                    "removed": len(removed),
                    "skipped": len(result.skipped),
                    "attribute_fetches": result.attribute_fetches,
                    "duration_s": round(self._clock.monotonic() - started_s, 3),
                },
            )
        self._known = result.names
        self._on_result(result)
        return result

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self._interval_s):
            try:
                self.run_once()
            except Exception as exc:  # a loop boundary: keep the last known set
                logger.warning(
                    "queue discovery failed; keeping the last result",
                    extra={"error": describe_error(exc)},
                )
