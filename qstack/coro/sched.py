"""Priority-ordered wake-ups: a blocked handler resumes by its request's level.

gevent resumes a waiting greenlet from its hub greenlet: a socket watcher, a
timer, ``Event.set``, ``Queue.put``, a lock release or a kill all end in
``waiting_greenlet.switch(value)`` or ``.throw(exc)`` called while the hub
greenlet runs (through ``Waiter.switch``, ``getcurrent().switch`` links or
``loop.run_callback``).  gevent runs those in the order the loop found them,
so a high-priority handler whose Redis reply arrived waits behind every
low-priority handler woken in the same loop turn.

:class:`Worker` is the greenlet class of the hub's workers.  While it serves a
request (``qstack_level`` is set) a switch or throw into it *from gevent's
hub greenlet* is not performed there but queued in a :class:`ReadyQueue`, one
FIFO per level; the hub's scheduler (``Hub._run``, a loop callback) then
performs the queued wake-ups highest level first, FIFO within a level.  So
any gevent-cooperative code -- redis-py over gevent sockets, ``gevent.sleep``,
events, queues, locks -- resumes by priority with no change to handlers.

Semantics kept.  A greenlet blocked in gevent can be resumed once per wait:
the first wake-up wins, and gevent stops the other watchers of that wait
(e.g. the timeout's timer once the socket answered) when the greenlet runs.
Deferred, both may be collected in the same loop turn, so a second wake-up
for a greenlet already queued is dropped -- what gevent itself would have
done, since the first would have run and cancelled the second.  Switches
from anything but the hub greenlet (a greenlet switching to another
directly) are performed at once, as are switches into a worker that is not
serving a request (the hub's own leader/follower hand-offs).

Cost.  Nothing per request: the override runs only on wake-ups from gevent,
and the hub turns deferral off altogether with one level (priority off then
means gevent's own FIFO).  Greenlets a handler spawns itself (``gevent.spawn``)
are gevent's own class and resume in gevent's order.
"""

from collections import deque

from greenlet import getcurrent, greenlet

__all__ = ["ReadyQueue", "Worker"]

_switch = greenlet.switch
_throw = greenlet.throw


class ReadyQueue:
    """Woken workers waiting for the scheduler, one FIFO per level."""

    __slots__ = ("queues", "levels", "count")

    def __init__(self, levels):
        self.levels = levels
        self.queues = [deque() for _ in range(levels)]
        self.count = 0

    def push(self, level, entry):
        self.queues[level].append(entry)
        self.count += 1

    def top(self):
        """The highest level with a woken worker, or ``levels`` if none."""
        if self.count:
            for level, q in enumerate(self.queues):
                if q:
                    return level
        return self.levels

    def pop(self, level):
        self.count -= 1
        return self.queues[level].popleft()

    def __len__(self):
        return self.count


class Worker(greenlet):
    """A hub worker greenlet whose wake-ups from gevent go through the
    scheduler while it serves a request (see the module docstring)."""

    def __init__(self, run, parent, sched):
        super().__init__(run, parent)
        self.qstack_level = None    # the level of the request in hand, or None
        self._sched = sched         # has .ordered, .hub_greenlet and .defer()
        self._queued = False        # a wake-up is waiting in the ReadyQueue

    def switch(self, *args, **kwargs):
        s = self._sched
        if self.qstack_level is not None and s.ordered and getcurrent() is s.hub_greenlet:
            if not self._queued:
                self._queued = True
                s.defer(self, (_switch, args, kwargs))
            return None
        return _switch(self, *args, **kwargs)

    def throw(self, *args):
        s = self._sched
        if self.qstack_level is not None and s.ordered and getcurrent() is s.hub_greenlet:
            if not self._queued:
                self._queued = True
                s.defer(self, (_throw, args, {}))
            return None
        return _throw(self, *args)

    def resume(self, entry):
        """Perform a wake-up the scheduler took from the ReadyQueue."""
        self._queued = False
        how, args, kwargs = entry
        return how(self, *args, **kwargs)
