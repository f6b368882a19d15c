"""The hub layer: priority run queues and greenlet worker pools per core.

Hub and StreamHub load the native core's binding (qstack.transport), so they
are imported on first use;
the pure run queue imports without it.
"""

from .runqueue import RunQueue

__all__ = ["Hub", "RunQueue", "StreamHub"]


def __getattr__(name):
    if name == "Hub":
        from .hub import Hub
        return Hub
    if name == "StreamHub":
        from .streams import StreamHub
        return StreamHub
    raise AttributeError(name)
