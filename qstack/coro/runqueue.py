"""Priority run queues: strict priority with an optional guaranteed share.

Pure and deterministic: no I/O, no clock.  The hub keeps one FIFO per level
(0 is the highest) and asks :meth:`RunQueue.pop` which request runs next.

Strict priority alone starves lower levels under sustained high-priority
load.  ``low_share`` (0 <= s < 1) reserves a share of dispatches for lower
levels *while they have work waiting*: after ``burst`` consecutive dispatches
from the top non-empty level with a lower level waiting, one dispatch goes to
the highest waiting lower level.  ``burst = round((1 - s) / s)``, so s = 0.1
gives 9 high : 1 low, s = 0.5 alternates.  With nothing lower waiting the
counter resets, so the share never delays high work that has no competition.
"""

from collections import deque

__all__ = ["RunQueue", "share_burst"]


def share_burst(low_share):
    """Consecutive top-level dispatches allowed before a lower level's turn."""
    if not 0.0 <= low_share < 1.0:
        raise ValueError(f"low_share must be in [0, 1), got {low_share!r}")
    if low_share == 0.0:
        return 0
    return max(1, round((1.0 - low_share) / low_share))


class RunQueue:
    __slots__ = ("queues", "levels", "_burst", "_streak")

    def __init__(self, levels, low_share=0.0):
        if levels < 1:
            raise ValueError("levels must be >= 1")
        self.levels = levels
        self.queues = [deque() for _ in range(levels)]
        self._burst = share_burst(low_share)
        self._streak = 0

    def push(self, level, item):
        self.queues[level].append(item)

    def __len__(self):
        return sum(len(q) for q in self.queues)

    def __bool__(self):
        return any(self.queues)

    def pop(self):
        """The next item by priority, or None when every queue is empty."""
        queues = self.queues
        for top, q in enumerate(queues):
            if q:
                break
        else:
            return None
        if self._burst:
            lower = next((q2 for q2 in queues[top + 1:] if q2), None)
            if lower is None:
                self._streak = 0
            elif self._streak >= self._burst:
                self._streak = 0
                return lower.popleft()
            else:
                self._streak += 1
        return q.popleft()
