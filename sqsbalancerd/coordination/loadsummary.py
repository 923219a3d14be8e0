"""The load summary an instance publishes in its member row, as one short string attribute.

    1|734|orders:12.5:410:37,billing:3.2:96:0

Version, utilisation in permille, then only the queues above ``min_load`` handler-s/s, most
loaded first: ``name:handler-s/s:messages/s:backlog``. Numbers carry three significant digits
(planning needs no more), never in exponent form. Size bound: at most ``MAX_LISTED`` (50)
queues and never more than ``MAX_BYTES`` (2,048) bytes, whatever the fleet's queue count;
entries are dropped from the least loaded end until it fits. 50 entries of 24-character names
with five-digit rates fit whole (~2,000 bytes); with SQS's full 80-character names about 20
do. Decoding never raises: anything malformed reads as the empty summary, which plans as an
idle member.
"""

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqsbalancerd.coordination.loadplan import QueueLoad

VERSION = "1"
MAX_LISTED = 50
MAX_BYTES = 2048
MIN_LOAD = 0.05  # handler-s/s: below this a queue is idle to the planner anyway
# SQS queue names: up to 80 of these, ".fifo" included for FIFO queues.
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,80}")


@dataclass(frozen=True, slots=True)
class QueueSample:
    queue: str
    handler_s_per_s: float
    messages_per_s: float
    backlog: int  # approximate visible messages, the last time it was sampled


@dataclass(frozen=True, slots=True)
class LoadSummary:
    utilisation: float  # busy worker fraction, 0..1
    queues: tuple[QueueSample, ...] = ()


EMPTY = LoadSummary(0.0)


def encode(
    summary: LoadSummary,
    *,
    min_load: float = MIN_LOAD,
    max_listed: int = MAX_LISTED,
    max_bytes: int = MAX_BYTES,
    shared: frozenset[str] = frozenset(),
) -> str:
    """The attribute value: busiest queues first, cut to ``max_listed`` and ``max_bytes``.

    ``shared``: queues this instance holds as one of several owners, listed whatever their
    load: a queue split k ways can fall under ``min_load`` on every owner and would read as
    idle, losing all its replicas at once.
    """
    head = f"{VERSION}|{_permille(summary.utilisation)}|"
    listed = sorted(
        (s for s in summary.queues if _is_listed(s, min_load, shared)),
        key=lambda s: (-s.handler_s_per_s, s.queue),
    )[:max_listed]
    entries = [_entry(sample) for sample in listed]
    size = len(head) + sum(len(e) for e in entries) + max(0, len(entries) - 1)
    while entries and size > max_bytes:
        size -= len(entries.pop()) + (1 if entries else 0)
    return head + ",".join(entries)


def _is_listed(sample: QueueSample, min_load: float, shared: frozenset[str]) -> bool:
    is_busy = sample.handler_s_per_s > min_load or sample.queue in shared
    return is_busy and _NAME.fullmatch(sample.queue) is not None


def _permille(utilisation: float) -> int:
    if not math.isfinite(utilisation):
        return 0
    return round(min(1.0, max(0.0, utilisation)) * 1000)


def _number(value: float) -> str:
    """Three significant digits in the fewest characters: no exponents, no tiny fractions."""
    if not math.isfinite(value) or value < 0.001:
        return "0"
    text = f"{min(value, 1e12):.3g}"  # clamped: no measurement is near, and 1e308 rounds to inf
    return str(int(float(text))) if "e" in text else text


def _entry(sample: QueueSample) -> str:
    return ":".join(
        (
            sample.queue,
            _number(sample.handler_s_per_s),
            _number(sample.messages_per_s),
            _number(sample.backlog) if sample.backlog > 0 else "0",
        )
    )


def decode(value: object) -> LoadSummary:
    """The summary in ``value``; the empty summary for anything that is not a valid one."""
    if not isinstance(value, str) or len(value) > 4 * MAX_BYTES:
        return EMPTY
    parts = value.split("|")
    if len(parts) != 3 or parts[0] != VERSION or not parts[1].isdigit():
        return EMPTY
    permille = int(parts[1])
    samples = [_sample(entry) for entry in parts[2].split(",")] if parts[2] else []
    if permille > 1000 or None in samples:
        return EMPTY
    valid = [s for s in samples if s is not None]
    if len({s.queue for s in valid}) != len(valid):
        return EMPTY
    return LoadSummary(permille / 1000, tuple(valid))


def _sample(entry: str) -> QueueSample | None:
    fields = entry.split(":")
    if len(fields) != 4 or not _NAME.fullmatch(fields[0]) or not fields[3].isdigit():
        return None
    handler, messages = _parse(fields[1]), _parse(fields[2])
    if handler is None or messages is None:
        return None
    return QueueSample(fields[0], handler, messages, int(fields[3]))


def _parse(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def queue_loads(
    summaries: Iterable[LoadSummary],
    previous: Mapping[str, int] | None = None,
) -> dict[str, QueueLoad]:
    """Each listed queue's load summed over its owners' summaries, for the planner.

    ``previous`` is the last round's `backlogs`: a backlog above it is growing.
    """
    handler: dict[str, float] = {}
    backlog = backlogs(summaries := list(summaries))
    for summary in summaries:
        for sample in summary.queues:
            handler[sample.queue] = handler.get(sample.queue, 0.0) + sample.handler_s_per_s
    before = previous or {}
    return {
        queue: QueueLoad(
            load,
            is_backlog_growing=backlog[queue] > before.get(queue, 0),
            backlog=backlog[queue],
        )
        for queue, load in sorted(handler.items())
    }


def backlogs(summaries: Iterable[LoadSummary]) -> dict[str, int]:
    """Each listed queue's backlog: the largest any owner saw (they sample one queue)."""
    found: dict[str, int] = {}
    for summary in summaries:
        for sample in summary.queues:
            found[sample.queue] = max(found.get(sample.queue, 0), sample.backlog)
    return found
