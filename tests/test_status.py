"""The warnings `status` prints under its tables (pure: built from instance and queue views)."""

from __future__ import annotations

from sqsbalancerd.status import InstanceView, QueueView, _warnings


def instance(name: str, queues: list[str], *, alive: bool = True) -> InstanceView:
    return InstanceView(
        instance_id=name,
        host="host",
        status="active",
        alive=alive,
        heartbeat_age_seconds=1.0,
        queues=tuple(queues),
        started_at=0.0,
        protocol=1,
    )


def owned(split: dict[str, list[str]]) -> tuple[tuple[InstanceView, ...], tuple[QueueView, ...]]:
    instances = tuple(instance(name, queues) for name, queues in split.items())
    queue_views = tuple(
        QueueView(queue=q, queue_url=f"http://sqs/{q}", owner=name)
        for name, queues in split.items()
        for q in queues
    )
    return instances, queue_views


def test_a_cluster_at_the_capacity_is_not_an_imbalance() -> None:
    # 60 queues over 3: capacity ceil(1.1 * 20) = 22, and the ring may fill a member to it.
    names = [f"q{index:02d}" for index in range(60)]
    instances, queues = owned({"a": names[:22], "b": names[22:41], "c": names[41:]})
    assert _warnings(instances, queues, 1.10) == ()


def test_more_than_the_capacity_is_an_imbalance() -> None:
    names = [f"q{index:02d}" for index in range(60)]
    instances, queues = owned({"a": names[:23], "b": names[23:41], "c": names[41:]})
    assert _warnings(instances, queues, 1.10) == (
        "imbalance: an instance owns 23 queues (capacity 22 at load_factor 1.1)",
    )


def test_unowned_queues_and_dead_owners_are_named() -> None:
    instances = (instance("a", ["q1"]), instance("b", ["q2"], alive=False))
    queues = (
        QueueView("q1", "http://sqs/q1", "a"),
        QueueView("q2", "http://sqs/q2", "b"),
        QueueView("q3", "http://sqs/q3", None),
    )
    assert set(_warnings(instances, queues, 1.10)) == {
        "queue q3 has no owner",
        "queue q2 is owned by b, which is not alive",
        "instance b looks dead (stale record)",
    }
