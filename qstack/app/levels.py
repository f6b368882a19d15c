"""The priority level of the work in hand, for handlers and the libraries
they call.

The hub runs every message handler on one of its worker greenlets and, for
as long as the handler runs (blocked or not), keeps the request's level on
that greenlet as ``qstack_level``.  The hub resumes a woken worker by that
level (see qstack/coro/sched.py), so anything the handler waits on -- a
socket, a sleep, an event, a lock -- resumes it ahead of lower levels.
"""

from greenlet import getcurrent

__all__ = ["current_level"]


def current_level():
    """The level (0 is highest) of the request the calling greenlet serves,
    or None outside a message handler."""
    return getattr(getcurrent(), "qstack_level", None)
