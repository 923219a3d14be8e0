"""Replica slots: how a queue gets several owners, each with a row of its own.

A queue's first owner holds its ordinary ownership row (sk ``queue#<name>``); a queue the
load planner splits k ways has k-1 more rows, ``queue#<name>#r<i>`` (SQS names cannot hold
``#``). Every row is an ordinary ownership row — lease, conditional writes, release after
draining, fencing — so "exclusive" holds per (queue, replica) by the same protocol as for
whole queues, and a queue has at most as many owners as rows are held. The coordinator
treats slots as it treated queues; only the engine sees the queue itself (consumed while
any of its slots is held).

Pure: which slot each planned owner takes. A current holder keeps its slot; new owners take
the lowest free indices, so a queue split once keeps the same rows from then on.
"""

from __future__ import annotations

from collections.abc import Mapping

SEPARATOR = "#r"

Owners = tuple[str, ...]


def slot_name(queue: str, index: int) -> str:
    return queue if index == 0 else f"{queue}{SEPARATOR}{index}"


def split(slot: str) -> tuple[str, int]:
    """(queue, index) of a slot; a plain queue name is index 0."""
    queue, separator, index = slot.rpartition(SEPARATOR)
    if separator and queue and index.isdigit() and not index.startswith("0"):
        return queue, int(index)
    return slot, 0


def base_of(slot: str) -> str:
    return split(slot)[0]


def holders(owners: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """queue -> {holder: its lowest slot index}, from slot -> owner."""
    found: dict[str, dict[str, int]] = {}
    for slot, owner in owners.items():
        queue, index = split(slot)
        held = found.setdefault(queue, {})
        held[owner] = min(index, held.get(owner, index))
    return found


def place(planned: Mapping[str, Owners], owners: Mapping[str, str]) -> dict[str, str]:
    """slot -> owner for the planned owners of each queue, keeping current holders' slots."""
    current = holders(owners)
    result: dict[str, str] = {}
    for queue in sorted(planned):
        wanted = sorted(set(planned[queue]))
        kept = {m: i for m, i in current.get(queue, {}).items() if m in wanted}
        used = set(kept.values())
        free = (i for i in range(len(wanted) + len(used)) if i not in used)
        for member in wanted:
            index = kept[member] if member in kept else next(free)
            result[slot_name(queue, index)] = member
    return result
