"""App counters: named event counts per priority level, kept per process.

    import qstack
    qstack.count("redis_errors", req.priority)

The runtime counts what it sees (messages, bytes, latency per level); an app
counts what only it can see -- a backend error, a message answered with
nothing -- so that no message is lost silently.  ``--stats`` prints the
non-zero counters per level beside the runtime's figures, and the ``total``
line sums them over cores; each core's exit log line lists them too.

Counters are cumulative and belong to the core process that counted them
(one per core, forked from a parent that never counts, so each starts at
zero).  They are only touched by the hub's thread, so no lock.

Cost: an app that never counts pays nothing (the snapshot checks one empty
dict).  A count is one dict lookup, one bounds check and one list increment;
a new name or a higher level than seen before takes the slow path once.
"""

__all__ = ["count", "snapshot", "reset"]

_counters: dict[str, list[int]] = {}


def count(name: str, level: int = 0, n: int = 1) -> None:
    """Add ``n`` to counter ``name`` at priority ``level`` (0 is highest)."""
    values = _counters.get(name)
    if values is None or not 0 <= level < len(values):
        values = _grow(name, level)
    values[level] += n


def _grow(name, level):
    if not isinstance(name, str) or not name:
        raise TypeError(f"counter name must be a non-empty str, got {name!r}")
    if not isinstance(level, int) or level < 0:
        raise ValueError(f"counter level must be an int >= 0, got {level!r}")
    values = _counters.setdefault(name, [])
    values.extend([0] * (level + 1 - len(values)))
    return values


def snapshot() -> dict[str, list[int]]:
    """A copy of every counter: ``{name: [count at level 0, level 1, ...]}``."""
    return {name: list(values) for name, values in _counters.items()}


def reset() -> None:
    """Forget every counter (tests)."""
    _counters.clear()
