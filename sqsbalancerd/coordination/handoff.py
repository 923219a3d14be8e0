"""Following a plan's moves until the ownership rows settle: the handoff's state machine.

planned → (rows move) → settled: the rows are the assignment's fixed point for this view,
and every queue has a live owner; from then on everyone keeps exactly what the rows give.
planned → (rows stop moving for STALL_ROUNDS) → planned again from the rows as they are.
A row left free for ORPHAN_ROUNDS while following (plans made from different views, say a
queue only some have discovered) is taken by an instance with room, whatever its plan
says, so a disagreement cannot leave a queue unowned. The decisions are pure; the
coordinator acts on them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# Rounds between planning and our first release: the others plan within one round of us.
RELEASE_DELAY_ROUNDS = 2
# A handoff whose rows have not changed for this many rounds is planned again from them.
STALL_ROUNDS = 3
# A row left free this many rounds (plans disagreed) is taken by a following instance with
# room, whatever its plan says: a queue must not wait for the next view change.
ORPHAN_ROUNDS = 2 * STALL_ROUNDS


@dataclass(slots=True)
class Handoff:
    planned_at_s: float
    last_owners: dict[str, str] | None = None
    unchanged_since_s: float = 0.0
    free_since_s: dict[str, float] = field(default_factory=dict)

    def orphans(self, current: Mapping[str, str | None], now_s: float, after_s: float) -> list[str]:
        """Queues whose row has been free for `after_s` (tracked across calls)."""
        self.free_since_s = {
            q: self.free_since_s.get(q, now_s) for q, owner in current.items() if owner is None
        }
        return sorted(q for q, since in self.free_since_s.items() if now_s - since >= after_s)

    def stalled_for_s(self, owners: dict[str, str], now_s: float) -> float | None:
        """How long the rows have not moved; None when they just did."""
        if owners != self.last_owners:
            self.last_owners = owners
            self.unchanged_since_s = now_s
            return None
        return now_s - self.unchanged_since_s


def is_settled(
    current: Mapping[str, str | None],
    *,
    members: tuple[str, ...],
    is_agreed: bool,
    fixed: Callable[[], Mapping[str, str]],
) -> bool:
    """Every queue has a live owner and — when all members see the same queues — the rows
    are the fixed point of the assignment (`fixed`: planning from them would move nothing)."""
    if not all(owner in members for owner in current.values()):
        return False
    if not is_agreed:
        return True
    return dict(current) == dict(fixed())
