"""What one instance should own, and how that differs from what it owns now.

Pure functions over frozen dataclasses; the membership layer supplies the live sets and acts on
the diff (acquire before polling, release after draining).
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqsbalancerd.coordination.ring import rebalance


@dataclass(frozen=True, slots=True)
class OwnershipDiff:
    """Change from the queues an instance owns to the ones it should own."""

    to_acquire: frozenset[str]
    to_release: frozenset[str]
    keep: frozenset[str]

    @property
    def owned_after(self) -> frozenset[str]:
        """Queues owned once the diff is applied."""
        return self.keep | self.to_acquire

    @property
    def has_changes(self) -> bool:
        return bool(self.to_acquire or self.to_release)


def owned_by(assignment: Mapping[str, str], member: str) -> frozenset[str]:
    """Queues the assignment gives to ``member``."""
    return frozenset(queue for queue, owner in assignment.items() if owner == member)


def plan(
    *,
    queues: Iterable[str],
    members: Iterable[str],
    me: str,
    currently_owned: Iterable[str],
    owners: Mapping[str, str],
    virtual_nodes: int,
    load_factor: float,
) -> OwnershipDiff:
    """Diff between what ``me`` owns now and what ``rebalance`` gives it.

    ``owners`` is every queue's current owner as the ownership rows say (the history the
    assignment keeps to). ``me`` is not added to ``members``: an instance outside the live
    set (not yet joined, or expired) should own nothing, so it releases everything. Owned
    queues that no longer exist are released too.
    """
    assignment = rebalance(
        queues, members, owners, virtual_nodes=virtual_nodes, load_factor=load_factor
    )
    target = owned_by(assignment, me)
    current = frozenset(currently_owned)
    return OwnershipDiff(
        to_acquire=target - current,
        to_release=current - target,
        keep=target & current,
    )
