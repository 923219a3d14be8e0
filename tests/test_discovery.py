"""Discovery: ListQueues paging and prefix, filters, dead-letter queues, named queues."""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from hypothesis import given
from hypothesis import strategies as st
from moto import mock_aws
from support import FakeClock, wait_until

from sqsbalancerd.config import DiscoverySettings
from sqsbalancerd.discovery import Discovery, DiscoveryLoop, literal_prefix
from sqsbalancerd.errors import QueueNotFoundError
from sqsbalancerd.local import create_queues
from sqsbalancerd.runtime import ThreadSupervisor

ACCOUNT_URL = "https://sqs.us-east-1.amazonaws.com/000000000000"

# -- literal_prefix -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("^work-", "work-"),
        ("^work-.*", "work-"),
        ("^work-[0-9]+$", "work-"),
        ("^orders_v2-(eu|us)", None),  # any "|" gives up (conservative, never wrong)
        ("^work-\\d", "work-"),
        ("^work\\-a", "work"),  # an escape ends the literal part (conservative)
        ("^works?", "work"),  # the s is optional
        ("^works*", "work"),
        ("^works{0,1}", "work"),
        ("^works+", "works"),  # at least one s
        ("^ab?", "a"),
        ("^a?b", None),
        ("^a*", None),
        ("^.", None),
        ("^", None),
        ("^$", None),
        ("^(work)", None),
        ("^[w]ork", None),
        ("^work|^other", None),  # alternation: no common prefix assumed
        ("^work-(a|b)", None),
        ("work-", None),  # not anchored
        ("-work$", None),
        ("(?i)^work", None),  # flags first: not a literal prefix
        ("", None),
        (None, None),
    ],
)
def test_literal_prefix(pattern, prefix):
    assert literal_prefix(pattern) == prefix


_NAME = st.text(alphabet="abcxyz-_0123456789", min_size=1, max_size=12)
_PATTERN = st.lists(
    st.one_of(
        st.sampled_from(list("abc-_0")),
        st.sampled_from([".", "\\d", "?", "*", "+", "{1,2}", "[ab]", "(a|b)", "|", "$"]),
    ),
    max_size=8,
).map(lambda parts: "^" + "".join(parts))


@given(pattern=_PATTERN, name=_NAME)
def test_a_name_the_pattern_matches_always_starts_with_the_prefix(pattern, name):
    """Listing by QueueNamePrefix must never hide a queue the pattern would match."""
    try:
        compiled = re.compile(pattern)
    except re.error:
        return
    prefix = literal_prefix(pattern)
    if prefix is not None and compiled.search(name):
        assert name.startswith(prefix), (pattern, name, prefix)


# -- paging (a stub client: moto is too slow with thousands of queues) ----------------------


class PagedSqs:
    """ListQueues like SQS: a NextToken only when MaxResults is given, at most 1000 a page."""

    def __init__(self, names: list[str]) -> None:
        self.urls = [f"{ACCOUNT_URL}/{name}" for name in names]
        self.list_calls: list[dict[str, Any]] = []
        self.attribute_calls = 0

    def list_queues(self, **kwargs: Any) -> dict[str, Any]:
        self.list_calls.append(dict(kwargs))
        prefix = kwargs.get("QueueNamePrefix", "")
        urls = [u for u in self.urls if u.rsplit("/", 1)[1].startswith(prefix)]
        if "MaxResults" not in kwargs:
            return {"QueueUrls": urls[:1000]}
        size = min(int(kwargs["MaxResults"]), 1000)
        start = int(kwargs.get("NextToken", "0"))
        page: dict[str, Any] = {"QueueUrls": urls[start : start + size]}
        if start + size < len(urls):
            page["NextToken"] = str(start + size)
        return page

    def get_queue_attributes(self, QueueUrl: str, AttributeNames: list[str]) -> dict[str, Any]:
        self.attribute_calls += 1
        name = QueueUrl.rsplit("/", 1)[1]
        return {
            "Attributes": {
                "QueueArn": f"arn:aws:sqs:us-east-1:000000000000:{name}",
                "VisibilityTimeout": "30",
            }
        }


def discovery_for(sqs: Any, **settings: Any) -> Discovery:
    return Discovery(sqs, DiscoverySettings(**settings))


def test_lists_every_page_with_max_results_and_next_token():
    names = [f"work-{n:04d}" for n in range(2_500)] + [f"other-{n}" for n in range(300)]
    sqs = PagedSqs(names)

    result = discovery_for(sqs, queue_pattern="^work-").discover()

    assert len(result.matched) == 2_500
    assert [c.get("NextToken") for c in sqs.list_calls] == [None, "1000", "2000"]
    assert all(c["MaxResults"] == 1000 for c in sqs.list_calls)
    assert all(c["QueueNamePrefix"] == "work-" for c in sqs.list_calls)


def test_without_a_literal_prefix_everything_is_listed_and_filtered():
    names = [f"a-work-{n}" for n in range(1_200)] + [f"b-{n}" for n in range(900)]
    sqs = PagedSqs(names)

    result = discovery_for(sqs, queue_pattern="work").discover()

    assert len(result.matched) == 1_200
    assert len(sqs.list_calls) == 3
    assert all("QueueNamePrefix" not in c for c in sqs.list_calls)
    assert {s.reason for s in result.skipped} == {"does not match queue_pattern"}
    assert len(result.skipped) == 900


class RecordingSqs(PagedSqs):
    """PagedSqs that notes when each queue's attributes were read, on a FakeClock."""

    def __init__(self, names: list[str], clock: FakeClock) -> None:
        super().__init__(names)
        self.clock = clock
        self.reads: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def get_queue_attributes(self, QueueUrl: str, AttributeNames: list[str]) -> dict[str, Any]:
        with self._lock:
            self.reads.setdefault(QueueUrl, []).append(self.clock.monotonic())
        return super().get_queue_attributes(QueueUrl=QueueUrl, AttributeNames=AttributeNames)


def test_every_cached_queue_is_read_again_within_attribute_max_age_a_slice_at_a_time():
    clock = FakeClock()
    sqs = RecordingSqs([f"work-{n:03d}" for n in range(120)], clock)
    discovery = Discovery(
        sqs,
        DiscoverySettings(queue_pattern="^work-", interval=300, attribute_max_age=3600),
        clock=clock,
    )
    per_refresh = []
    for _ in range(30):  # 2.5 times attribute_max_age of refreshes
        before = sqs.attribute_calls
        result = discovery.discover()
        assert len(result.matched) == 120
        assert result.attribute_fetches == sqs.attribute_calls - before
        per_refresh.append(result.attribute_fetches)
        clock.advance(300)

    assert per_refresh[0] == 120  # the cold start reads every queue
    assert set(per_refresh[1:]) == {10}  # then ceil(120 · 300 / 3600) a refresh, no burst
    for url, reads in sqs.reads.items():
        gaps = [later - earlier for earlier, later in itertools.pairwise(reads)]
        assert gaps and max(gaps) <= 3600, url


class BarrierSqs(PagedSqs):
    """Each GetQueueAttributes waits until `parties` are in flight: serial calls time out."""

    def __init__(self, names: list[str], parties: int) -> None:
        super().__init__(names)
        self.barrier = threading.Barrier(parties, timeout=5)
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()

    def get_queue_attributes(self, QueueUrl: str, AttributeNames: list[str]) -> dict[str, Any]:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            self.barrier.wait()
            return super().get_queue_attributes(QueueUrl=QueueUrl, AttributeNames=AttributeNames)
        finally:
            with self._lock:
                self.in_flight -= 1


def test_attributes_are_read_concurrently_within_the_bound():
    sqs = BarrierSqs([f"work-{n:02d}" for n in range(40)], parties=4)

    result = discovery_for(sqs, queue_pattern="^work-", attribute_concurrency=4).discover()

    assert len(result.matched) == 40
    assert sqs.attribute_calls == 40
    assert sqs.most_in_flight == 4
    assert not [t for t in threading.enumerate() if t.name.startswith("sqsb-discovery")]


def test_a_failed_refresh_keeps_what_it_read_and_the_next_reads_the_rest():
    sqs = PagedSqs([f"work-{n:02d}" for n in range(50)])
    original = sqs.get_queue_attributes
    failing = {f"{ACCOUNT_URL}/work-25"}

    def flaky(QueueUrl: str, AttributeNames: list[str]) -> dict[str, Any]:
        if QueueUrl in failing:
            failing.clear()
            raise ClientError({"Error": {"Code": "InternalError", "Message": "x"}}, "Get")
        return original(QueueUrl=QueueUrl, AttributeNames=AttributeNames)

    sqs.get_queue_attributes = flaky  # type: ignore[method-assign]
    discovery = discovery_for(sqs, queue_pattern="^work-", attribute_concurrency=4)
    with pytest.raises(ClientError):
        discovery.discover()
    read_before = sqs.attribute_calls

    result = discovery.discover()

    assert len(result.matched) == 50
    assert read_before >= 25  # whatever was read before the failure stays cached
    assert result.attribute_fetches < 50


# -- filters, dead-letter queues and named queues (moto) ------------------------------------


@pytest.fixture
def moto_sqs() -> Iterator[Any]:
    with mock_aws():
        yield boto3.client("sqs", region_name="us-east-1")


def names(result: Any) -> list[str]:
    return sorted(q.name for q in result.matched)


def reasons(result: Any) -> dict[str, str]:
    return {s.name: s.reason for s in result.skipped}


def test_dead_letter_queues_are_skipped_by_default(moto_sqs):
    create_queues(moto_sqs, ["work-a", "work-b"])  # each with its own work-*-dlq

    result = discovery_for(moto_sqs, queue_pattern="^work-").discover()

    assert names(result) == ["work-a", "work-b"]
    assert reasons(result) == {
        "work-a-dlq": "dead-letter queue of another",
        "work-b-dlq": "dead-letter queue of another",
    }
    info = next(q for q in result.matched if q.name == "work-a")
    assert info.has_redrive_policy
    assert info.dead_letter_target_arn.endswith(":work-a-dlq")


def test_dead_letter_queues_can_be_included(moto_sqs):
    create_queues(moto_sqs, ["work-a"])
    result = discovery_for(
        moto_sqs, queue_pattern="^work-", include_dead_letter_queues=True
    ).discover()
    assert names(result) == ["work-a", "work-a-dlq"]


def test_exclude_pattern_and_non_matching_queues(moto_sqs):
    create_queues(moto_sqs, ["work-a", "work-a-test", "other"], dead_letter=False)
    result = discovery_for(moto_sqs, queue_pattern="work", exclude_pattern="-test$").discover()
    assert names(result) == ["work-a"]
    assert reasons(result) == {
        "work-a-test": "matches exclude_pattern",
        "other": "does not match queue_pattern",
    }


def test_queue_attributes_are_read(moto_sqs):
    moto_sqs.create_queue(
        QueueName="work-f.fifo", Attributes={"FifoQueue": "true", "VisibilityTimeout": "77"}
    )
    [info] = discovery_for(moto_sqs, queue_pattern="^work-").discover().matched
    assert info.is_fifo
    assert info.visibility_timeout_s == 77
    assert info.arn.endswith(":work-f.fifo")
    assert not info.has_redrive_policy


def test_named_queues_by_name_and_url_join_the_pattern(moto_sqs):
    urls = create_queues(moto_sqs, ["work-a", "named-b", "named-c", "ignored"], dead_letter=False)
    result = discovery_for(
        moto_sqs,
        queue_pattern="^work-",
        exclude_pattern="named",  # applies to the pattern, not to named queues
        queues=("named-b", urls["named-c"]),
    ).discover()
    assert names(result) == ["named-b", "named-c", "work-a"]


def test_named_queues_alone(moto_sqs):
    create_queues(moto_sqs, ["named-b", "work-a"], dead_letter=False)
    log: list[str] = []
    moto_sqs.meta.events.register("before-call.sqs.*", lambda model, **_: log.append(model.name))
    result = discovery_for(moto_sqs, queues=("named-b",)).discover()
    assert names(result) == ["named-b"]
    assert "ListQueues" not in log


def test_a_missing_named_queue_is_an_error_when_strict_and_a_warning_otherwise(moto_sqs, caplog):
    create_queues(moto_sqs, ["work-a"], dead_letter=False)
    discovery = discovery_for(moto_sqs, queue_pattern="^work-", queues=("nope",))

    with pytest.raises(QueueNotFoundError, match='"nope"'):
        discovery.discover(strict=True)

    caplog.set_level(logging.WARNING, logger="sqsbalancerd")
    assert names(discovery.discover()) == ["work-a"]
    assert any("named queue missing" in r.getMessage() for r in caplog.records)


def test_a_missing_named_queue_url_is_an_error_when_strict(moto_sqs):
    discovery = discovery_for(moto_sqs, queues=(f"{ACCOUNT_URL}/nope",))
    with pytest.raises(QueueNotFoundError, match="nope"):
        discovery.discover(strict=True)
    assert names(discovery.discover()) == []


def test_other_errors_on_named_queues_propagate(moto_sqs):
    def deny(**_: Any) -> None:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "GetQueueUrl")

    moto_sqs.meta.events.register("before-call.sqs.GetQueueUrl", deny)
    with pytest.raises(ClientError):
        discovery_for(moto_sqs, queues=("named",)).discover()


def test_a_queue_deleted_between_list_and_attributes_is_left_out(moto_sqs):
    urls = create_queues(moto_sqs, ["work-a", "work-b"], dead_letter=False)

    def delete_b_first(params: dict[str, Any], **_: Any) -> None:
        if params.get("QueueUrl") == urls["work-b"]:
            moto_sqs.meta.events.unregister(
                "before-parameter-build.sqs.GetQueueAttributes", delete_b_first
            )
            moto_sqs.delete_queue(QueueUrl=urls["work-b"])

    moto_sqs.meta.events.register("before-parameter-build.sqs.GetQueueAttributes", delete_b_first)
    assert names(discovery_for(moto_sqs, queue_pattern="^work-").discover()) == ["work-a"]


def count_calls(sqs: Any) -> Counter[str]:
    calls: Counter[str] = Counter()
    sqs.meta.events.register("before-call.sqs.*", lambda model, **_: calls.update([model.name]))
    return calls


def test_a_refresh_reads_the_new_queues_and_a_slice_of_the_cached_ones(moto_sqs):
    create_queues(moto_sqs, [f"work-{n:02d}" for n in range(24)], dead_letter=False)
    clock = FakeClock()
    discovery = Discovery(
        moto_sqs,
        DiscoverySettings(queue_pattern="^work-", interval=300, attribute_max_age=3600),
        clock=clock,
    )
    calls = count_calls(moto_sqs)
    assert len(discovery.discover().matched) == 24
    assert calls == {"ListQueues": 1, "GetQueueAttributes": 24}

    create_queues(moto_sqs, ["work-new-1", "work-new-2"], dead_letter=False)
    calls.clear()
    clock.advance(300)
    result = discovery.discover()

    assert len(result.matched) == 26
    # the two new queues, plus ceil(24 · 300 / 3600) = 2 of the cached ones
    assert calls == {"ListQueues": 1, "GetQueueAttributes": 4}
    assert result.attribute_fetches == 4


def test_a_redrive_policy_set_later_is_seen_within_attribute_max_age(moto_sqs):
    urls = create_queues(moto_sqs, ["work-a", "work-b", "work-c"], dead_letter=False)
    clock = FakeClock()
    discovery = Discovery(
        moto_sqs,
        DiscoverySettings(queue_pattern="^work-", interval=300, attribute_max_age=900),
        clock=clock,
    )
    assert names(discovery.discover()) == ["work-a", "work-b", "work-c"]
    arn_b = moto_sqs.get_queue_attributes(QueueUrl=urls["work-b"], AttributeNames=["QueueArn"])
    policy = {"deadLetterTargetArn": arn_b["Attributes"]["QueueArn"], "maxReceiveCount": "3"}
    moto_sqs.set_queue_attributes(
        QueueUrl=urls["work-a"], Attributes={"RedrivePolicy": json.dumps(policy)}
    )

    seen_after = None
    for refresh in range(1, 4):  # attribute_max_age / interval refreshes at most
        clock.advance(300)
        if names(discovery.discover()) == ["work-a", "work-c"]:
            seen_after = refresh
            break
    assert seen_after is not None, "work-b never recognised as a dead-letter queue"


# -- the refresh loop -------------------------------------------------------------------------


def test_the_loop_picks_up_a_new_queue_at_the_next_refresh(moto_sqs):
    create_queues(moto_sqs, ["work-a"], dead_letter=False)
    results: list[frozenset[str]] = []
    loop = DiscoveryLoop(
        discovery_for(moto_sqs, queue_pattern="^work-"),
        interval_s=0.05,
        on_result=lambda result: results.append(result.names),
    )
    assert loop.run_once(strict=True).names == {"work-a"}

    supervisor = ThreadSupervisor()
    stop = threading.Event()
    supervisor.spawn("discovery", loop.run, stop)
    try:
        create_queues(moto_sqs, ["work-b"], dead_letter=False)
        wait_until(
            lambda: results[-1] == {"work-a", "work-b"}, timeout_s=10, what="work-b discovered"
        )
    finally:
        assert supervisor.stop_all(timeout_s=5) == []


def test_the_loop_keeps_going_when_a_refresh_fails(moto_sqs, caplog):
    create_queues(moto_sqs, ["work-a"], dead_letter=False)
    failures = [1, 1]

    def flaky(**_: Any) -> None:
        if failures:
            failures.pop()
            raise ClientError({"Error": {"Code": "InternalError", "Message": "x"}}, "ListQueues")

    moto_sqs.meta.events.register("before-call.sqs.ListQueues", flaky)
    results: list[frozenset[str]] = []
    loop = DiscoveryLoop(
        discovery_for(moto_sqs, queue_pattern="^work-"),
        interval_s=0.05,
        on_result=lambda result: results.append(result.names),
    )
    caplog.set_level(logging.WARNING, logger="sqsbalancerd")
    supervisor = ThreadSupervisor()
    supervisor.spawn("discovery", loop.run, threading.Event())
    try:
        wait_until(lambda: results, timeout_s=10, what="a successful refresh")
    finally:
        assert supervisor.stop_all(timeout_s=5) == []
    assert results[0] == {"work-a"}
    failed = [r for r in caplog.records if "discovery failed" in r.getMessage()]
    assert len(failed) == 2
