"""Find the queues to consume: ListQueues (paginated) filtered by regex, plus named queues.

Queue attributes are fetched once per queue and cached: they rarely change, and asking
again every refresh would cost one call per queue per interval.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from sqsbalancerd.aws import describe_error, error_code
from sqsbalancerd.config import DiscoverySettings
from sqsbalancerd.errors import QueueNotFoundError

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


class Discovery:
    def __init__(self, sqs: SQSClient, settings: DiscoverySettings) -> None:
        self._sqs = sqs
        self._settings = settings
        self._include = re.compile(settings.queue_pattern) if settings.queue_pattern else None
        self._exclude = re.compile(settings.exclude_pattern) if settings.exclude_pattern else None
        self._attributes: dict[str, QueueInfo] = {}

    def discover(self, *, strict: bool = False) -> DiscoveryResult:
        """One refresh. `strict` turns a missing named queue into QueueNotFoundError."""
        candidates: dict[str, str] = {}  # url -> why it is a candidate
        if self._include is not None:
            for url in self._list_urls():
                candidates[url] = "pattern"
        for url in self._named_queue_urls(strict=strict):
            candidates[url] = "named"
        return self._classify(candidates, strict=strict)

    def _classify(self, candidates: dict[str, str], *, strict: bool) -> DiscoveryResult:
        matched: list[QueueInfo] = []
        skipped: list[SkippedQueue] = []
        infos: list[QueueInfo] = []
        for url, origin in sorted(candidates.items()):
            name = queue_name_from_url(url)
            reason = self._filter_reason(name, origin)
            if reason:
                skipped.append(SkippedQueue(name, url, reason))
                continue
            info = self._info(url)
            if info is not None:
                infos.append(info)
            elif origin == "named":  # a queue named by URL: only now do we know it is missing
                _named_queue_missing(url, strict=strict)
        self._forget_except({info.url for info in infos})
        dlq_arns = {i.dead_letter_target_arn for i in infos if i.dead_letter_target_arn}
        for info in infos:
            if info.arn in dlq_arns and not self._settings.include_dead_letter_queues:
                skipped.append(SkippedQueue(info.name, info.url, "dead-letter queue of another"))
            else:
                matched.append(info)
        return DiscoveryResult(tuple(matched), tuple(sorted(skipped, key=lambda s: s.name)))

    def _filter_reason(self, name: str, origin: str) -> str | None:
        if origin == "named":
            return None
        if self._include is not None and not self._include.search(name):
            return "does not match queue_pattern"
        if self._exclude is not None and self._exclude.search(name):
            return "matches exclude_pattern"
        return None

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

    def _info(self, url: str) -> QueueInfo | None:
        cached = self._attributes.get(url)
        if cached is not None:
            return cached
        try:
            attributes = self._sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
        except ClientError as exc:
            if error_code(exc) in _QUEUE_MISSING:
                return None  # deleted between listing and now
            raise
        raw: Mapping[str, str] = attributes.get("Attributes", {})  # type: ignore[assignment]
        info = _info_from_attributes(url, raw)
        self._attributes[url] = info
        return info

    def _forget_except(self, urls: set[str]) -> None:
        for url in list(self._attributes):
            if url not in urls:
                del self._attributes[url]


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
    )


class DiscoveryLoop:
    """Refresh every `interval` seconds and hand each result on."""

    def __init__(
        self,
        discovery: Discovery,
        *,
        interval_s: float,
        on_result: Callable[[DiscoveryResult], None],
    ) -> None:
        self._discovery = discovery
        self._interval_s = interval_s
        self._on_result = on_result
        self._known: frozenset[str] = frozenset()

    def run_once(self, *, strict: bool = False) -> DiscoveryResult:
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
