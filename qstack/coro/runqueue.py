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

__all__ = ["RunQueue", "default_reserve", "reserve_table", "share_burst"]


def default_reserve(workers, levels):
    """Workers held back per level when the config names none: a quarter of
    the pool, split evenly over the levels above the lowest."""
    if levels < 2:
        return ()
    return ((workers // 4) // (levels - 1),) * (levels - 1)


def reserve_table(workers, levels, reserve=None):
    """``below[busy]``: how many levels (0..n-1) may start a request while
    ``busy`` workers are inside a handler.

    ``reserve[l]`` workers may only be used by levels <= l (the DARC policy:
    capacity held back for the protected classes, not work-conserving), so
    level L may start a request while ``busy < workers - sum(reserve[:L])``.
    None means :func:`default_reserve`.
    """
    if reserve is None:
        reserve = default_reserve(workers, levels)
    reserve = tuple(reserve)
    if len(reserve) > max(levels - 1, 0):
        raise ValueError(f"reserve has {len(reserve)} entries; at most levels - 1 "
                         f"= {levels - 1} (the lowest level reserves nothing)")
    if any(r < 0 for r in reserve) or sum(reserve) >= workers:
        raise ValueError(f"reserve {list(reserve)} must be >= 0 and leave the lowest "
                         f"level at least one of the {workers} workers")
    limits = [workers - sum(reserve[:level]) for level in range(levels)]
    return [sum(busy < limit for limit in limits) for busy in range(workers + 1)]


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

    def pop(self, below=None):
        """The next item by priority, or None when every queue is empty.

        ``below`` limits the pop to levels < below (the levels that may take
        a worker now, see the hub's reserve); None means every level.
        """
        queues = self.queues
        if below is not None and below < self.levels:
            queues = queues[:below]
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
