"""Priority-ordered wake-ups: a blocked handler resumes by its request's level.

gevent resumes a waiting greenlet from its hub greenlet, in the order its
loop finds the wake-ups: a high-priority handler whose Redis reply arrived
waits behind every low-priority handler woken in the same loop turn.  Three
mechanisms put the high one first, none of which changes what gevent does,
only when:

1. **A ready queue per level.**  Every wait on a watcher -- a socket's
   readiness (redis-py or any library over gevent sockets),
   ``gevent.sleep``, anything that ends in ``Hub.wait`` -- is marked by
   :func:`install_wait_priorities` while a worker serving a request waits
   in it; ``Event.set`` and ``AsyncResult.set`` wake their waiters with the
   event as the value.  Such a wake-up, arriving from gevent's hub greenlet,
   is not performed there but queued in a :class:`ReadyQueue`, one FIFO per
   level, which the hub's scheduler empties highest level first, in time
   slices so that the loop polls between them.
2. **Watcher priorities.**  The same waits start their watcher at the libev
   priority of the worker's level, so within one loop iteration the level-0
   watchers are invoked first (the lowest level keeps libev's default, the
   priority every other watcher has).
3. **Urgent work first.**  A wake-up that is not queued (below) passes
   through :meth:`Worker.switch`; before performing it, the hub runs what
   is more urgent (``Hub.before_resume``): new work and queued wake-ups of
   a level above the woken worker's.  The wake-up itself then happens as
   gevent asked, just later.

Why not queue every wake-up?  Because gevent's semaphores, locks and queues
hand their resource to a waiter by switching to it and then look at their
state again: a wake-up that did not run at once would make a semaphore wake
every waiter for one unit (gevent asserts) and a queue hand one item to
every getter.  Reordering those would change *who* gets the resource, not
just when it runs; they keep gevent's FIFO order.  The two kinds are told
apart without guessing: a worker waiting in ``Hub.wait`` can only be woken
by its watcher (or a timeout or kill), never by a hand-off, and an event's
waiters take nothing from it.

A greenlet blocked in gevent is resumed once per wait: if a queued event
wake-up is waiting for it, any later wake-up (a timeout's timer, say) is
dropped, as gevent itself would have cancelled it once the first had run.
Wake-ups from anything but gevent's hub greenlet, and into a worker that is
not serving a request (the hub's own leader/follower hand-offs), are
performed at once.  With one level (priority off) none of this is active.
Greenlets a handler spawns (``gevent.spawn``, a ``gevent.pool.Pool``)
carry the level of the request in hand when they were spawned, through
gevent's own inheritance: a new ``gevent.Greenlet`` takes its spawner's
``spawn_tree_locals``, and a worker's are made on demand from its level
(:attr:`Worker.spawn_tree_locals`), so spawning costs the hub nothing per
request.  :func:`level_of` reads either, so ``qstack.current_level()``,
LevelPool and the watcher priority of (2) hold for them and for the
greenlets they spawn in turn.  Their wake-ups are not queued by level:
gevent's Greenlet is a compiled class whose ``switch`` cannot be
intercepted, so they resume in gevent's order within a loop turn.
"""

from collections import deque

from gevent.event import AsyncResult, Event
from gevent.hub import Hub as _GeventHub
from greenlet import getcurrent, greenlet

__all__ = ["ReadyQueue", "Worker", "install_wait_priorities", "level_of", "libev_priority"]

_switch = greenlet.switch
_throw = greenlet.throw
_DEFERRABLE = (Event, AsyncResult)
EV_MAXPRI = 2
EV_MINPRI = -2


def libev_priority(level, levels):
    """The libev priority of a watcher a level-``level`` handler waits on:
    the lowest level gets libev's default (0), each level above one more,
    and levels above the top priority share it."""
    return max(EV_MINPRI, min(EV_MAXPRI, levels - 1 - level))


_priorities = None      # level -> libev priority, once installed
_gevent_wait = _GeventHub.wait


LEVEL_KEY = "qstack_level"        # in spawn_tree_locals: the spawner's level


def level_of(g):
    """The level of the request greenlet ``g`` serves: a worker's own, or,
    for a greenlet spawned while one ran, the level it was spawned at;
    None for anything else."""
    level = getattr(g, "qstack_level", None)
    if level is None:
        tree = getattr(g, "spawn_tree_locals", None)
        if tree:
            level = tree.get(LEVEL_KEY)
    return level


def _wait(hub, watcher):
    g = getcurrent()
    level = getattr(g, "qstack_level", None)
    if level is None:
        level = level_of(g)
        watcher.priority = 0 if level is None else _priorities[level]
        return _gevent_wait(hub, watcher)
    watcher.priority = _priorities[level]
    g._on_watcher = True        # its wake-up is this watcher's: safe to queue
    try:
        return _gevent_wait(hub, watcher)
    finally:
        g._on_watcher = False


def install_wait_priorities(levels):
    """Make every ``Hub.wait`` start its watcher at the waiting worker's
    priority (process-wide; idempotent).  Needs gevent's libev loop, whose
    watchers have priorities; on another loop it does nothing and says so
    by returning False."""
    global _priorities
    from gevent import get_hub
    if not hasattr(get_hub().loop.timer(0), "priority"):
        return False
    # every level a greenlet may carry (one past the configured ones too)
    _priorities = [libev_priority(min(level, levels - 1), levels) for level in range(64)]
    _GeventHub.wait = _wait
    return True


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
    """A hub worker greenlet whose wake-ups from gevent pass the hub's
    scheduler while it serves a request (see the module docstring)."""

    def __init__(self, run, parent, sched):
        super().__init__(run, parent)
        self.qstack_level = None    # the level of the request in hand, or None
        self._sched = sched         # has .ordered, .hub_greenlet, .defer(), .before_resume()
        self._queued = False        # a wake-up is waiting in the ReadyQueue
        self._on_watcher = False    # blocked in Hub.wait (a socket, a sleep...)

    def switch(self, *args, **kwargs):
        level = self.qstack_level
        if level is not None:
            s = self._sched
            if getcurrent() is s.hub_greenlet:
                if self._queued:
                    return None             # an earlier wake-up is queued
                if s.ordered:
                    if self._on_watcher or (args and isinstance(args[0], _DEFERRABLE)):
                        self._queued = True
                        s.defer(self, (_switch, args, kwargs))
                        return None
                    s.before_resume(level)
                    if self._queued:        # woken meanwhile by a queued event
                        return None
        return _switch(self, *args, **kwargs)

    def throw(self, *args):
        level = self.qstack_level
        if level is not None:
            s = self._sched
            if getcurrent() is s.hub_greenlet:
                if self._queued:
                    return None
                if s.ordered:
                    if self._on_watcher:
                        self._queued = True
                        s.defer(self, (_throw, args, {}))
                        return None
                    s.before_resume(level)
                    if self._queued:
                        return None
        return _throw(self, *args)

    @property
    def spawn_tree_locals(self):
        """What gevent gives the greenlets this worker spawns (gevent reads it
        once per spawn): the level of the request in hand, if any.  A fresh
        dict per spawn, so siblings do not share their tree locals as
        gevent's own greenlets' children do."""
        level = self.qstack_level
        return {} if level is None else {LEVEL_KEY: level}

    @spawn_tree_locals.setter
    def spawn_tree_locals(self, value):
        pass                        # nothing to keep: made anew on each read

    def resume(self, entry):
        """Perform a wake-up the scheduler took from the ReadyQueue."""
        self._queued = False
        how, args, kwargs = entry
        return how(self, *args, **kwargs)
