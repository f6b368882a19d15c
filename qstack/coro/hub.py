"""The per-core hub: priority dispatch of native events to greenlet workers.

This is libco's design on greenlet, on top of gevent's loop.

Leader/follower.  A request handed from a dispatcher greenlet to a worker
greenlet costs a switch there and back (about 285 ns measured, the largest
Python cost per request).  So there is no dispatcher: one of the W workers is
the *leader*; it pops the next event itself and calls the handler in its own
frame.  The others are parked followers.  Leadership moves only when the
leader's handler blocks (switches to gevent's hub, e.g. on gevent.sleep or a
cooperative socket): then a follower takes over the rings, so a blocked
handler suspends only its own worker.

Detecting "the leader blocked" costs nothing per request: whenever a worker
becomes leader it arms one callback on gevent's loop (``_on_turn``).  gevent
runs callbacks only when its hub greenlet gets control, which happens only
if the leader switched away.  If the leader switched away on purpose (to
wait for work or to give the loop a turn), ``_parked`` is set and the
callback lapses; otherwise the leader is blocked inside a handler and the
callback runs the scheduler (``_run``), which gives the rings to a follower.
A worker whose handler returns after it lost leadership runs the scheduler
too (it may have freed the worker a parked leader waits for) and becomes a
follower again (or the leader, if nobody leads: all were blocked).

Priority.  Native rings are per level and polled highest first into a
:class:`RunQueue`.  Before running a request of level L > 0 the leader checks
(one cheap native call) whether anything of a higher level waits natively and
refills first, so a high request never waits behind a queued low one.

Priority while handlers block.  Dispatch order alone is lost as soon as
handlers wait on something downstream; four things keep it:

- *Reserved workers* (``reserve``, the DARC policy of Persephone, SOSP'21):
  a request of level L may start only while fewer than ``limit[L]`` workers
  are inside a handler, ``limit[L] = workers - sum(reserve[:L])``.  Lower
  levels can never take the workers held back for higher ones, so a burst
  of blocked low handlers cannot leave a high request without a worker.
  Per request this is one list lookup (``_below[busy]``: how many levels may
  start now) passed to the run queue's pop.
- *Priority-ordered wake-ups* (qstack/coro/sched.py): a worker woken by
  gevent while it serves a request -- the watcher it waits on in
  ``Hub.wait`` fired (a socket, a sleep), or an event it waits on was set --
  is queued by its level instead of being switched to at once, and
  :meth:`_run`, the scheduler, performs the queued wake-ups highest level
  first, FIFO within a level, in slices of ``SLICE``: past it the lower
  levels wait for the next loop turn, so the loop polls again and a high
  wake-up that came in meanwhile goes ahead of them.  The scheduler also
  decides when the rings get a dispatcher (the parked leader, or a promoted
  follower): new work of level L goes before woken workers of levels > L
  and after those of levels <= L (older work of the same level first).  The
  leader checks the same rule before each request it runs (one attribute
  test when nothing waits).
- *Arrivals seen while low work is in flight*: the stack's fd (inline: its
  epoll fd; threaded: the wake eventfd) is watched by gevent's loop at
  libev's top priority for as long as the hub serves, so whenever the loop
  polls, a readable socket is read and classified first, and level-0 work
  starts at once (``_on_stack``).  It costs nothing while no socket is
  readable.  A leader whose handlers never block lets the loop poll at
  least every ``YIELD_AFTER`` (``_lead_yield``: gevent.sleep(0) would resume
  it before the loop polled).
- Downstream connections per level: qstack.LevelPool (app layer).

Fairness with gevent.  While there is work the leader drains the rings
without going through gevent's loop; every ``YIELD_AFTER`` it gives the
loop a turn so timers and handlers that were blocked can resume.  Time, not
a count of requests: a turn costs several microseconds (a poll and the
scheduler's Python), which after every 64 echo requests was a quarter of
the hub's CPU per request, while 64 slow handlers would hold timers too
long.  When the rings
are empty it parks, and the stack's watcher brings it back.

Commands (replies, buffer returns) collect as qs_cmd structs in a C queue
(``CommandQueue``, qstack/native/pyview/qslane.c) with a staging area for
copied replies, and reach the stack in one C call per batch.  A reply that
is the request's own buffer is sent without a copy; because QS_EV_DATA ==
QS_CMD_SEND_BUF and the layouts match, such an event *is* its own command.

One level in C.  When every message has the same level (no priority rule
and no classifier: the common case), that level's queue is an
``EventQueue``: the polled events stay qs_event structs, and the leader's
request loop runs in C (``EventQueue.run``, see ``_lead_lane``): it makes
the view, fills the request, calls the handler and queues its reply with no
Python in between, and returns to Python for everything else (an event that
is not a message, a handler that blocked, a turn for the loop).  That took
0.5 us of interpreter work per request out of the echo path.  With several
levels the same steps run in Python (``_lead``), where priority decisions
between requests need the run queue.
"""

import logging
import os
import time
from collections import deque
from time import monotonic
from itertools import starmap
from struct import Struct

import gevent
from gevent import get_hub
from greenlet import getcurrent

from .._qsview import (RUN_LOST, RUN_SLOW, RUN_YIELD, CommandQueue, EventQueue,
                       done as _view_done, view as _view)
from .errlog import handler_failed, peer_name
from qstack.transport import EVENT_SIZE, ffi, iter_events, jumbo_view, lib
from .runqueue import RunQueue, reserve_table
from .sched import EV_MAXPRI, EV_MINPRI, ReadyQueue, Worker, install_wait_priorities

__all__ = ["Hub"]

log = logging.getLogger("qstack")

EV_DATA = lib.QS_EV_DATA
EV_BIGDATA = lib.QS_EV_BIGDATA
ACCEPTED = lib.QS_EV_ACCEPTED
CLOSED = lib.QS_EV_CLOSED
WRITABLE = lib.QS_EV_WRITABLE
EV_BODY = lib.QS_EV_BODY
BODY_LAST = lib.QS_BODY_LAST
BODY_ERR = lib.QS_BODY_ERR
SEQ_SHIFT = lib.QS_SEQ_SHIFT
BODY_PAUSE_AT = 64 << 10    # a streamed body's bytes held for its app: pause the conn
BODY_RESUME_AT = 16 << 10   # ... until the app has taken all but this many
SEND_BUF = lib.QS_CMD_SEND_BUF
SEND_COPY = lib.QS_CMD_SEND_COPY
DONE = lib.QS_CMD_DONE
RELEASE = lib.QS_CMD_RELEASE
CLOSE = lib.QS_CMD_CLOSE
F_CLOSE = lib.QS_F_CLOSE
F_KEEP = lib.QS_F_KEEP
NO_POLL = lib.QS_STEP_NO_POLL
assert EV_DATA == SEND_BUF

YIELD_AFTER = 0.001 # s: a leader whose handlers never block yields at least this often
SLICE = 0.0005      # s: the scheduler runs lower levels this long, then lets the loop poll
HOT_BATCH = 4       # inline: a refill this big means more is coming; poll at once
POLL_EVERY = 0.0005 # s: while the scheduler runs this long, read the sockets again
_pack_cmd = Struct("8q").pack


class BodyRefused(Exception):
    """A streamed request body the stack refused: .status is QS_HTTP_ERR_*."""

    def __init__(self, status):
        super().__init__(f"request body refused (QS_HTTP_ERR {status})")
        self.status = status


class _Body:
    """A streamed request body's events, waiting for its handler."""

    __slots__ = ("events", "held", "paused", "wake", "level")

    def __init__(self, level):
        self.events = deque()
        self.held = 0
        self.paused = False
        self.wake = None
        self.level = level


class Hub:
    """Runs one core's handlers: start() puts the workers on gevent's loop,
    drain() finishes the work in hand and stops the native core."""

    def __init__(self, core, handler, *, workers=64, low_share=0.0,
                 classifier=None, batch=128, make_request, make_connection,
                 send_level=None, reserve=None, on_connect=None, on_close=None):
        self.core = core
        self._poll = core.poll
        self._submit = core.submit
        self._pending_above = core.pending_above
        self._sleep_below = core.sleep_below
        self._core_step = core.step
        self._slab = core.slab
        self._handler = handler
        self._levels = core.levels
        self._rq = RunQueue(core.levels, low_share)
        self._queues = self._rq.queues
        self._classifier = classifier
        self._polled = list(enumerate(self._queues))
        self._multilevel = core.levels > 1 and (core.only_level is None or classifier is not None)
        self._batch = batch
        self._evbuf = ffi.new("qs_event[]", batch)
        self._evview = memoryview(ffi.buffer(self._evbuf))
        self._lane = None
        if core.only_level is not None and classifier is None and not core.stream:
            # Every message gets one level (no rule): one ring to poll, and
            # its requests run in C (_lead_lane).
            self._lane = EventQueue(int(ffi.cast("uintptr_t", self._evbuf)), batch)
            self._queues[core.only_level] = self._lane
            self._only_level = core.only_level
            self._polled = [(core.only_level, self._lane)]
        # Commands, in order, as qs_cmd structs; submitted from C when the
        # core is native (a test's fake core takes them through Python).
        self._native_submit = getattr(core, "submit_address", None)
        self._cq = CommandQueue(*(self._native_submit or ()))
        self._make_request = make_request
        self._make_connection = make_connection
        # app.on_connect / app.on_close: called for ACCEPTED / CLOSED events
        # (the core reports them when a hook is set, core.conn_events)
        self._conn_hooks = {ACCEPTED: on_connect, CLOSED: on_close}
        self._writable_waiters = {}     # conn -> wake(ln), see wait_writable
        self._bodies = {}               # (conn, seq) -> _Body, see body_read
        self._bodies_done = set()       # (conn, seq) whose handler left the body unread
        self.send_level = core.levels - 1 if send_level is None else send_level
        self._ghub = get_hub()
        self._loop = self._ghub.loop
        self._inline = core.inline
        self._hot = False
        # Inline, the rings change only in a step of ours: after a refill
        # that emptied them, and until the next step, nothing waits there
        # and the per-request look (pending_above) is skipped.
        self._drained = False
        self._wake = self._loop.io(core.wake_fd, 1)
        self._nworkers = workers
        self._workers = set()
        self._idle = []
        self._leader = None
        self._parked = False            # the leader switched away outside a handler
        self._waiting = False           # ... and waits for the scheduler to resume it
        self._sleeper = None            # stream mode: the dispatcher asleep in _wait_events
        self._flush_scheduled = False
        self._armed = False
        self._native_gone = False
        self.errors = 0
        # Priority while handlers block (see the module docstring).
        self._busy = 0                  # workers inside a handler
        self._below = reserve_table(workers, core.levels, reserve)
        self._ready = ReadyQueue(core.levels)
        self.ordered = core.levels > 1  # read by sched.Worker
        self.hub_greenlet = self._ghub
        self._run_scheduled = False
        self._poll_due = False
        self._stack_w = self._loop.io(core.wake_fd, 1)
        self._next_poll = 0.0
        # Resuming after one poll of the loop: a due timer at the lowest
        # priority runs after that turn's I/O; an idle watcher keeps the
        # poll from blocking (libev waits at least 1 ms for a due timer).
        self._yield_idle = self._loop.idle()
        self._yield_timer = self._loop.timer(0)
        self._cont_idle = self._loop.idle()
        self._cont_timer = self._loop.timer(0)
        for w in (self._yield_idle, self._yield_timer, self._cont_idle, self._cont_timer):
            w.priority = EV_MINPRI
        self._t_yield = 0.0
        if self._lane is not None:
            self._lane.bind(self, handler, self._cq, core.slab_addr, self._kept_free,
                            self._handler_failed, YIELD_AFTER)
            stack = getattr(core, "stack_address", None)
            if self._inline and stack and self._native_submit:
                # run() refills an empty lane itself (qslane.c): _refill in C
                self._lane.bind_stack(*stack, self._only_level)
        if self.ordered and not core.stream:
            if install_wait_priorities(core.levels):
                self._stack_w.priority = EV_MAXPRI     # arrivals before wake-ups
            else:
                log.warning("gevent's loop has no watcher priorities (not libev): "
                            "blocked handlers resume in gevent's order")

    # -- rings ------------------------------------------------------------

    def _refill(self, step=False):
        """Move waiting events from the native rings into the run queue.

        Inline, ``step`` (or a hot stack) also reads the sockets first.
        """
        buf, view, batch = self._evbuf, self._evview, self._batch
        if self._inline:
            # Replies out; while busy also read the sockets right away, else
            # leave that to gevent's epoll_wait (see _on_stack).
            self._flush()
            if step or self._hot:
                self._poll_due = False
                self._core_step(0)
                self._next_poll = monotonic() + POLL_EVERY
        moved = 0
        drained = self._inline
        for level, q in self._polled:
            n = self._poll(level, buf, batch)
            if n:
                if n == batch:
                    drained = False
                moved += n
                if self._writable_waiters or self._bodies:
                    q.extend(self._take_side(iter_events(view[:n * EVENT_SIZE])))
                elif q is self._lane:
                    q.take(n)
                elif self._classifier is None:
                    q.extend(iter_events(view[:n * EVENT_SIZE]))
                else:
                    self._classify(iter_events(view[:n * EVENT_SIZE]))
        self._hot = moved >= HOT_BATCH
        self._drained = drained
        return moved

    def _classify(self, events):
        """The Python classifier fallback: decide the level of each message."""
        top = self._levels - 1
        for ev in events:
            level = 0
            if ev[0] == EV_DATA or ev[0] == EV_BIGDATA:
                try:
                    level = min(max(int(self._classifier(self._view(ev))), 0), top)
                except Exception:
                    log.exception("priority classifier failed; using level %d", top)
                    level = top
                ev = (ev[0], level) + ev[2:]
            self._queues[level].append(ev)

    def _view(self, ev):
        if ev[0] == EV_DATA:
            return self._slab[ev[4]:ev[4] + ev[5]]
        return jumbo_view(ev[4], ev[5])

    def _next(self):
        """The next event by priority that may take a worker now (see
        reserve), refilling from the rings as needed; None if there is none.

        Level-0 work in hand that may start goes first: neither a due poll
        nor the rings are looked at until it is done (a step reads up to a
        thousand frames, most of them lower-level work)."""
        queues = self._queues
        below = self._below[self._busy]
        if not queues[0] or not below:
            if self._poll_due:
                self._refill(True)
            elif not queues[0]:
                top = 1
                while top < self._levels and not queues[top]:
                    top += 1
                if top == self._levels or (not self._drained and self._pending_above(top)):
                    self._refill()
        return self._rq.pop(below)

    def _work_top(self):
        """The highest level with work that may take a worker now, or
        ``levels`` if none (what the leader's next pop would find).

        Inline, level-0 work in hand that may start is served before
        anything is read: neither the rings nor a due poll are looked at,
        and otherwise the rings only for levels above the best in hand.
        (Threaded, the rings are drained of every level that may start, as
        sleep_below's handshake in _run expects.)"""
        queues = self._queues
        below = self._below[self._busy]
        top = 0
        while top < below and not queues[top]:
            top += 1
        if self._inline:
            if top == 0 and below:
                return 0
            above = top
        else:
            above = below
        if self._poll_due or (not self._drained and self._pending_above(above)):
            self._refill(self._poll_due)
            top = 0
            while top < below and not queues[top]:
                top += 1
        return top if top < below else self._levels

    def queued(self):
        """Requests taken from the rings and waiting for a worker, per level."""
        return [len(q) for q in self._queues]

    def pending(self):
        return len(self._rq) + self._pending_above(self._levels)

    # -- commands ---------------------------------------------------------

    def _flush(self):
        """Hand every queued command to the stack thread in one call."""
        cq = self._cq
        if not cq:
            return
        if self._native_gone:
            self._release_commands()
            return
        if cq.flush() if self._native_submit else self._flush_through_python():
            if self._inline:
                self._step(NO_POLL)
        else:
            # A command ring is full: the rest stay queued (their staging
            # offsets stay valid until everything is taken); retry shortly.
            timer = self._loop.timer(0.0002)
            timer.start(self._flush_later, timer)

    def _flush_through_python(self):
        """_flush for a core that is not native (tests' fake cores): the
        commands go through its Python submit; True if all were taken."""
        cq = self._cq
        cmds, tx = cq.commands(), cq.staging()
        n = len(cmds)
        with ffi.from_buffer("qs_cmd[]", b"".join(starmap(_pack_cmd, cmds))) as p:
            if tx:
                with ffi.from_buffer(tx) as s:
                    done = self._submit(p, n, s)
            else:
                done = self._submit(p, n, ffi.NULL)
        cq.taken(done)
        return done >= n

    def _step(self, timeout):
        """Inline stack: run one step now (NO_POLL: just the commands).

        A step may publish events (a read, or a connection that was waiting
        for ring space) while the leader sleeps on the epoll fd: wake it.
        """
        self._drained = False
        if self._core_step(timeout) > 0 and self._sleeper is not None:
            self._loop.run_callback(self._kick)

    def _flush_later(self, timer):
        timer.close()
        self._flush()

    def _release_commands(self):
        """After the stack thread is gone: drop the buffers commands name."""
        for cmd in self._cq.commands():
            if cmd[3] and not cmd[7] & F_KEEP:     # kept: _kept_free releases it
                self.core.release_local(cmd[3])
        self._cq.clear()

    def post(self, op, level, conn, buf=0, data=b"", flags=0, t_rx=0):
        """Queue a command from anywhere (not the leader's hot path)."""
        self._cq.post(op, level, conn, buf, data, flags, t_rx)
        self._schedule_flush()

    def _schedule_flush(self):
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.run_callback(self._scheduled_flush)

    def _scheduled_flush(self):
        self._flush_scheduled = False
        self._flush()

    # -- sleeping ---------------------------------------------------------

    def _wait_events(self):
        """Sleep through gevent's loop until the stack has events.

        Threaded stack: on the eventfd the stack thread writes after we
        announced sleeping.  Inline stack: on the stack's epoll fd, through
        gevent's own epoll_wait -- so we do not poll the sockets ourselves
        before sleeping (that would be a second epoll_wait per wake-up); on
        wake-up one step reads them.  The commands-only step before sleeping
        also retries connections that waited for the ring space just freed.
        """
        self._flush()
        if self._inline:
            self._step(NO_POLL)
        self._parked = True
        try:
            if self._sleep_below(self._levels) == 0:
                self._sleeper = getcurrent()
                self._wake.start(self._kick)
                try:
                    self._ghub.switch()
                finally:
                    self._sleeper = None
                    self._wake.stop()
                if self._inline:
                    self._step(0)
                else:
                    try:
                        os.eventfd_read(self.core.wake_fd)
                    except BlockingIOError:
                        pass
        finally:
            self._parked = False

    def _kick(self):
        """Resume the sleeping leader, once, from the watcher or a step."""
        g = self._sleeper
        if g is not None:
            self._sleeper = None
            g.switch()

    def _yield(self):
        """Give gevent's loop one turn (timers, resumed handlers)."""
        self._flush()
        self._parked = True
        try:
            gevent.sleep(0)
        finally:
            self._parked = False

    def _lead_yield(self):
        """The leader gives gevent's loop a turn that polls I/O.

        gevent.sleep(0) would not do: it resumes the caller from the next
        round of callbacks, before the loop polls, so a leader whose
        handlers never block (Redis answered before we asked for the reply)
        would starve every wake-up -- the high-priority ones included --
        for a whole batch.  Instead the leader parks as waiting and is
        resumed by the scheduler once the loop has polled and run what it
        found: right after that turn's I/O (see _continue_later).
        """
        self._flush()
        self._yield_idle.start(self._yield_over)
        self._yield_timer.start(self._yield_over)
        self._parked = True         # not _waiting: nobody resumes it before the poll
        try:
            self._ghub.switch()
        finally:
            self._parked = self._waiting = False
            self._yield_idle.stop()
            self._yield_timer.stop()
            self._t_yield = monotonic() + YIELD_AFTER

    def _yield_over(self):
        """The loop polled: the yielding leader may be resumed (by _run, in
        priority order with what the poll woke)."""
        self._yield_idle.stop()
        self._yield_timer.stop()
        if self._parked and self._leader is not None:
            self._waiting = True
        self._run()

    def wake(self):
        """Wake a sleeping leader (used by drain())."""
        if not self._inline:
            os.eventfd_write(self.core.wake_fd, 1)

    # -- the scheduler: who runs next ---------------------------------------

    def defer(self, g, entry):
        """sched.Worker: gevent woke ``g``; queue it by its request's level."""
        self._ready.push(g.qstack_level, (g, entry))
        self._schedule_run()

    def _schedule_run(self):
        if not self._run_scheduled:
            self._run_scheduled = True
            self._loop.run_callback(self._run)

    def _arm(self):
        """A worker leads (again): if its handler blocks, the scheduler must
        give the rings to another worker.  Armed once per leadership, and
        cheap when the leader only parked (that path schedules _run itself)."""
        if not self._armed:
            self._armed = True
            self._loop.run_callback(self._on_turn)

    def _on_turn(self):
        self._armed = False
        if self._leader is not None and not self._parked:
            self._run()             # the leader blocked inside its handler

    def _on_stack(self):
        """The stack's fd is readable (a watcher at libev's top priority, so
        before this loop turn's wake-ups): read it, start level-0 work now,
        leave the rest to _run after the wake-ups."""
        if self._inline:
            self._poll_due = True
        else:
            try:
                os.eventfd_read(self.core.wake_fd)
            except BlockingIOError:
                pass
        if self._native_gone:
            self._schedule_run()
            return
        if self._lane is not None and self._inline and self._waiting and not self._ready.count:
            # One level, inline, the leader parked for work and nobody woken
            # (see _lead_lane): read the sockets and hand it what came; no
            # scheduler pass, there is nothing else for one to weigh.
            if self._work_top() < self._levels:
                self._dispatch()
            return
        while self._work_top() == 0 and self._dispatch():
            pass
        self._schedule_run()

    def before_resume(self, level):
        """sched.Worker: gevent is about to resume a worker serving a
        level-``level`` request; first run what is more urgent -- new work
        and queued wake-ups of higher levels.  Reads the sockets again if
        the last look is older than POLL_EVERY."""
        if self._native_gone:
            return
        if self._inline and monotonic() >= self._next_poll:
            self._poll_due = True
        ready = self._ready
        while True:
            rtop = ready.top()
            wtop = self._work_top() if level else self._levels
            if wtop < level and wtop < rtop and self._dispatch():
                continue
            if rtop < level:
                g, entry = ready.pop(rtop)
                g.resume(entry)
                continue
            return

    def _run(self):
        """Run what is runnable, highest level first, from gevent's hub.

        Each pass weighs the best woken worker (ReadyQueue.top) against the
        best new work that may take a worker (_work_top): new work of a
        strictly higher level gets a dispatcher first.  A dispatcher or a
        woken worker returns here when it blocks or parks.

        A pass is a time slice (SLICE): past it, what is left of the lower
        levels waits for the next loop turn, so the loop polls again and a
        high-priority wake-up that came in meanwhile goes ahead of them
        (level 0 is never left for later).  Before handing control back to
        the loop, replies are flushed and (threaded) the stack is told to
        write the eventfd when events come.
        """
        self._run_scheduled = False
        self._cont_idle.stop()
        self._cont_timer.stop()
        if self._leader is not None and not self._parked:
            # The leader blocked inside its handler: the rings need another
            # dispatcher, now or as soon as work comes (it leads again, and
            # re-arms, if nobody else does by the time its handler returns).
            self._leader = None
        ready, levels = self._ready, self._levels
        inline = self._inline
        t_end = monotonic() + SLICE
        while True:
            rtop = ready.top()
            if self._native_gone:
                wtop = levels
            else:
                if inline and monotonic() >= self._next_poll:
                    self._poll_due = True
                wtop = self._work_top()
            top = min(rtop, wtop)
            if 0 < top < levels and monotonic() >= t_end:
                self._flush()
                self._continue_later()
                return
            if wtop < rtop and self._dispatch():
                continue
            if rtop < levels:
                g, entry = ready.pop(rtop)
                g.resume(entry)
                if rtop < levels - 1 and self._cq:
                    self._flush()       # a high reply leaves at once
                continue
            if self._native_gone:
                return
            self._flush()
            if inline or self._sleep_below(self._below[self._busy]) == 0:
                return
            # threaded: work we may start came in meanwhile, go round again

    def _continue_later(self):
        """_run again once the loop has polled and run what it found: when
        it is idle, or on the next turn at the latest (a due timer at the
        lowest priority, after the I/O of that turn)."""
        self._cont_idle.start(self._run)
        self._cont_timer.start(self._run)

    def _dispatch(self):
        """Give the rings to a dispatcher now; False if none can run."""
        leader = self._leader
        if leader is not None:
            if self._waiting:
                leader.switch()     # not serving a request: switched at once
                return True
            if self._parked:
                return False        # yielding to the loop; back by itself
            self._leader = None     # blocked inside its handler: replace it
        if not self._idle:
            return False            # every worker is busy
        g = self._idle.pop()
        self._leader = g
        g.switch()
        return True

    def _park(self, quiet=False):
        """The leader waits for the scheduler (no work it may start, or
        woken workers that go first).  ``quiet``: without asking for a
        scheduler pass now -- the stack's watcher or a wake-up will."""
        self._parked = self._waiting = True
        if not quiet:
            self._schedule_run()
        try:
            self._ghub.switch()
        finally:
            self._parked = self._waiting = False

    # -- message workers ----------------------------------------------------

    def _worker(self):
        me = getcurrent()
        req = self._make_request(self)
        while not self._native_gone:
            if self._leader is None:
                self._leader = me
            elif self._leader is not me:
                self._idle.append(me)
                self._ghub.switch()     # parked until _run promotes us
                continue
            self._lead(me, req)

    def _lead_lane(self, me, req):
        """_lead when every message has one level: the requests run in C
        (EventQueue.run, qslane.c: the same steps as _lead's, in the same
        order), the rest here."""
        self._arm()
        q, ready, level = self._lane, self._ready, self._only_level
        run = q.run
        while not self._native_gone:
            if not q:
                self._refill()
                if not q:
                    # Inline with nobody woken, a scheduler pass would only
                    # find what _refill just did: the stack's watcher
                    # (_on_stack) resumes us when the sockets have more.
                    self._park(quiet=self._inline and not ready.count)
                    q.turned()      # the loop had its turn: a new yield interval
                    self._arm()
                    continue
            if ready.count and ready.top() <= level:
                self._park()        # woken workers of this level go first
                q.turned()
                self._arm()
                continue
            # Side events (a handler waiting for a body or for room) are
            # sorted in Python (_take_side): then only _refill takes events.
            status = run(me, req, not (self._writable_waiters or self._bodies))
            if status == RUN_SLOW:
                ev = q.popleft()
                if ev[0] >= WRITABLE:
                    self._side_event(ev)    # for a request in progress
                else:
                    # a connection came or went: app.on_connect / app.on_close
                    self._conn_event(me, ev[0], ev[1], ev[2])
                if self._leader is not me:
                    status = RUN_LOST
            if status == RUN_LOST:
                # We blocked and a follower took over (see _lead).
                self._schedule_run()
                return
            if status == RUN_YIELD:
                self._yield()               # callbacks and timers get a turn
                self._arm()

    def _lead(self, me, req):
        """Run requests while we lead.  The hot loop of qstack with several
        levels: every name it uses per request is a local, and the handler
        runs in this frame."""
        if self._lane is not None:
            return self._lead_lane(me, req)
        self._arm()
        handler, cmds, nxt = self._handler, self._cq, self._next
        base, view, done, on_free = self.core.slab_addr, _view, _view_done, self._kept_free
        ready = self._ready
        ordered = self._multilevel
        while not self._native_gone:
            ev = nxt()
            if ev is None:
                self._park()
                self._arm()
                continue
            kind, level, conn, buf, off, ln, t_rx, seq = ev
            if ready.count and ready.top() <= level:
                # woken workers of this level or higher go first
                self._queues[level].appendleft(ev)
                self._park()
                self._arm()
                continue
            if kind > EV_BIGDATA:
                if kind >= WRITABLE:
                    self._side_event(ev)    # for a request in progress
                else:
                    # a connection came or went: app.on_connect / app.on_close
                    self._conn_event(me, kind, level, conn)
                if self._leader is not me:
                    self._schedule_run()
                    return
                continue
            # a view of its own (qsview.c): done() below sees slices kept past the request
            data = view(base + off if kind == EV_DATA else off, ln)
            req.data = data
            req.priority = level
            req.conn_id = conn
            req.seq = seq           # already << QS_SEQ_SHIFT: a flags word
            me.qstack_level = level
            self._busy += 1
            try:
                out = handler(req)
                cmds.reply(ev, out, data)   # SEND_BUF (out is data), DONE (None) or a copy
            except Exception as exc:
                self._handler_failed(conn, exc)
                cmds.push(DONE, level, conn, buf, 0, 0, 0, seq | F_CLOSE)
            except BaseException:
                cmds.push(DONE, level, conn, buf, 0, 0, 0, seq | F_CLOSE)
                raise
            finally:
                me.qstack_level = None
                self._busy -= 1
                req.data = out = None       # done() looks for other holders of data
                if done(data, buf, on_free):
                    # A slice of req.data outlives the request: the stack keeps one
                    # more reference (F_KEEP on the request's command, the last one
                    # queued) until the slice dies (_kept_free).
                    cmds.keep_last()
            if self._leader is not me:
                # We blocked and a follower took over; it may be parked (for
                # work, or for the worker we just freed), so the scheduler
                # runs: it flushes our reply and dispatches what now may start.
                self._schedule_run()
                return
            if monotonic() >= self._t_yield:
                # Let the loop poll: wake-ups and arrivals of higher levels
                # must not wait for this run of requests.  Checked after every
                # request: with handlers of a millisecond, checking every few
                # requests would hold a level-0 arrival that long times more.
                if ordered:
                    self._lead_yield()
                else:
                    self._yield()       # callbacks and timers get a turn
                    self._t_yield = monotonic() + YIELD_AFTER
                self._arm()

    def _conn_event(self, me, kind, level, conn):
        """Run the hook of an ACCEPTED or CLOSED event, as a request: on this
        worker, at the event's level, counted busy; an exception is a handler
        error (counted and logged, rate-limited), never a crash."""
        hook = self._conn_hooks.get(kind)
        if hook is None:
            return
        me.qstack_level = level
        self._busy += 1
        try:
            hook(self._make_connection(self, conn))
        except Exception as exc:
            self._handler_failed(conn, exc)
        finally:
            me.qstack_level = None
            self._busy -= 1

    def _kept_free(self, buf):
        """The last view of a kept request died: its buffer goes back."""
        self.post(RELEASE, self.send_level, 0, buf)

    def _handler_failed(self, conn, exc):
        self.errors += 1
        handler_failed(self, conn, exc)     # rate-limited; names a bad reply's type

    # -- the Connection API (message mode) ----------------------------------

    def conn_send(self, conn, data, priority=None, wait=False, slot=None):
        """slot: (seq, level) of the request of this connection the caller
        serves (Request.conn), or None: the bytes go out in that request's
        place, at its level or higher, so they stay ahead of its reply.
        Without a slot and a priority they go at the calling handler's
        level (the lowest outside a handler)."""
        if priority is not None:
            priority = self.check_level(priority)
        if slot is None:
            level = priority
            if level is None:
                level = getattr(getcurrent(), "qstack_level", None)
                if level is None:
                    level = self.send_level
            self.post(SEND_COPY, level, conn, data=data)
        else:
            seq, level = slot
            if priority is not None and priority < level:
                level = priority
            self.post(SEND_COPY, level, conn, data=data, flags=seq)
        return len(data)

    def check_level(self, priority):
        """A send's priority, checked here: a bad one never reaches the rings."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int level, got {type(priority).__name__}")
        if not 0 <= priority < self._levels:
            raise ValueError(f"priority {priority} is out of range: levels are "
                             f"0..{self._levels - 1} (0 is highest)")
        return priority

    def conn_close(self, conn, slot=None):
        """slot as for conn_send: close right after that request's reply."""
        self.post(CLOSE, self.send_level, conn, flags=slot[0] if slot else 0)

    # -- events for a request in progress: WRITABLE, BODY --------------------
    #
    # A handler waiting for one is blocked in its worker, so these must not
    # wait for a worker to pop them: every worker may be waiting (a streamed
    # response or request body each).  While anyone waits, _refill routes
    # them as they come off the rings (_take_side); a wait that times out
    # looks through the rings and the queues itself (_rescue_side).

    def _side_event(self, ev):
        if ev[0] == EV_BODY:
            self._route_body(ev)
            return
        wake = self._writable_waiters.pop(ev[2], None)
        if wake is not None:
            wake(ev[5])         # len -1: the conn is gone

    def _is_side(self, ev):
        return ev[0] == EV_BODY or (ev[0] == WRITABLE and ev[2] in self._writable_waiters)

    def _take_side(self, events):
        out = []
        for ev in events:
            if ev[0] >= WRITABLE and self._is_side(ev):
                self._side_event(ev)
            else:
                out.append(ev)
        if self._classifier is not None:
            self._classify(out)
            return ()
        return out

    def _rescue_side(self):
        if self._native_gone:
            return
        self._refill()
        for q in self._queues:
            if any(ev[0] >= WRITABLE and self._is_side(ev) for ev in q):
                keep = [ev for ev in q if not (ev[0] >= WRITABLE and self._is_side(ev))]
                mine = [ev for ev in q if ev[0] >= WRITABLE and self._is_side(ev)]
                q.clear()
                q.extend(keep)
                for ev in mine:
                    self._side_event(ev)

    def _new_body(self, key, level):
        """A body's inbox, with its events that came while nobody routed
        them (no inbox existed: they went to the queues), in their order.
        From now on _refill routes every BODY as it comes, so none can
        overtake these."""
        b = self._bodies[key] = _Body(level)
        conn, seq = key
        for q in self._queues:
            if any(ev[0] == EV_BODY and ev[2] == conn for ev in q):
                mine = [ev for ev in q if ev[0] == EV_BODY and ev[2] == conn
                        and ev[7] >> SEQ_SHIFT == seq]
                if mine:
                    keep = [ev for ev in q if not (ev[0] == EV_BODY and ev[2] == conn
                                                   and ev[7] >> SEQ_SHIFT == seq)]
                    q.clear()
                    q.extend(keep)
                    for ev in mine:
                        b.events.append(ev)
                        b.held += ev[5]
        return b

    def _route_body(self, ev):
        conn, buf, aux = ev[2], ev[3], ev[7]
        key = (conn, aux >> SEQ_SHIFT)
        b = self._bodies.get(key)
        if b is None:
            if key in self._bodies_done:        # its handler is gone: drop it
                if buf:
                    self.post(RELEASE, ev[1], conn, buf)
                if aux & (BODY_LAST | BODY_ERR):
                    self._bodies_done.discard(key)
                return
            b = self._new_body(key, ev[1])
        b.events.append(ev)
        b.held += ev[5]
        if b.held > BODY_PAUSE_AT and not b.paused:
            b.paused = True
            self.post(lib.QS_CMD_PAUSE, b.level, conn)
        wake = b.wake
        if wake is not None:
            b.wake = None
            wake(True)

    def body_read(self, conn, seq, level):
        """The next piece of the streamed body of request ``seq`` (its
        number, req.seq >> QS_SEQ_SHIFT) on ``conn``: (bytes, last).  Blocks
        the calling greenlet until it comes.  Raises BodyRefused(status) if
        the stack refused the body (400, 413), ConnectionResetError if the
        peer left first.  Backpressure: the conn is paused while more than
        BODY_PAUSE_AT bytes wait here."""
        key = (conn, seq)
        b = self._bodies.get(key)
        if b is None:
            b = self._new_body(key, level)
        while not b.events:
            from gevent.event import AsyncResult
            res = AsyncResult()
            b.wake = res.set
            res.wait(1.0)
            if not res.ready():
                b.wake = None
                self._rescue_side()
                if not b.events:
                    # nothing for a second: is the conn still there?  (a BODY
                    # telling it left may have found its ring full)
                    self.wait_writable(conn, level)
        ev = b.events.popleft()
        buf, off, ln, aux = ev[3], ev[4], ev[5], ev[7]
        b.held -= ln
        if aux & BODY_ERR:
            del self._bodies[key]
            if off == 0:
                raise ConnectionResetError(f"connection {conn:#x} closed amid the body")
            raise BodyRefused(off)
        data = jumbo_view(off, ln).tobytes() if ln else b""
        if buf:
            self.post(RELEASE, level, conn, buf)
        if aux & BODY_LAST:
            del self._bodies[key]
            if b.paused:
                self.post(lib.QS_CMD_RESUME, level, conn)
            return data, True
        if b.paused and b.held <= BODY_RESUME_AT:
            b.paused = False
            self.post(lib.QS_CMD_RESUME, level, conn)
        return data, False

    def body_done(self, conn, seq):
        """The handler of request ``seq`` is done with its body, read or not:
        what is held goes back, what comes later is dropped on arrival."""
        key = (conn, seq)
        b = self._bodies.pop(key, None)
        ended = False
        if b is not None:
            for ev in b.events:
                if ev[3]:
                    self.post(RELEASE, ev[1], conn, ev[3])
                ended = ended or bool(ev[7] & (BODY_LAST | BODY_ERR))
        if not ended:
            if len(self._bodies_done) > 65536:
                self._bodies_done.clear()       # conns long gone: only memory
            self._bodies_done.add(key)

    def wait_writable(self, conn, level, timeout=1.0):
        """Block the calling greenlet until the stack has written everything
        queued on ``conn`` (a WRITABLE event), at most ``timeout`` seconds.
        Returns True when written, False on the timeout, and raises
        ConnectionResetError once the conn is gone.  It asks with an empty
        send flagged QS_F_NOTIFY (queued after the caller's sends at that
        level); the stack answers a NOTIFY for a conn already gone too, so
        calling again after a False (a WRITABLE lost to a full ring) is
        always answered."""
        from gevent.event import AsyncResult
        res = AsyncResult()
        self._writable_waiters[conn] = res.set
        self.post(SEND_COPY, level, conn, data=b"", flags=lib.QS_F_NOTIFY)
        ln = res.wait(timeout)
        if not res.ready():
            self._rescue_side()
            ln = res.value
        if not res.ready():
            if self._writable_waiters.get(conn) == res.set:
                del self._writable_waiters[conn]
            return False
        if ln < 0:
            raise ConnectionResetError(f"connection {conn:#x} is closed")
        return True

    def conn_peer(self, conn):
        """``(host, port)`` of the connection's peer, or None if unknown."""
        return self.core.peer(conn)

    def conn_name(self, conn):
        """The connection as a log line names it: its peer's address."""
        return peer_name(self.core.peer(conn)) or f"connection {conn:#x}"

    def conn_recv(self, conn, bufsize):
        raise TypeError("recv() is for stream handlers (mark the handler with @qstack.stream)")

    def busy_workers(self):
        """Workers inside a handler (for graceful shutdown)."""
        return self._busy

    # -- lifecycle ------------------------------------------------------------

    def start(self):
        for _ in range(self._nworkers):
            g = Worker(self._worker, self._ghub, self)
            self._workers.add(g)
            self._loop.run_callback(g.switch)
        self._stack_w.start(self._on_stack)

    def drain(self, grace):
        """Stop taking new work, finish what is queued, stop the stack thread.

        Returns True if everything finished within ``grace`` seconds.
        """
        self.post(lib.QS_CMD_STOP_ACCEPT, 0, 0)
        self._stop_reading()
        self._flush()
        deadline = time.monotonic() + grace
        clean = True
        while self.pending() or self.busy_workers():
            if time.monotonic() >= deadline:
                clean = False
                break
            self.wake()
            if self._stack_w.active:
                self._schedule_run()
            gevent.sleep(0.005)
        self._flush()
        self._stack_w.stop()
        if self._lane is not None:
            self._lane.bind_stack(0, 0, 0, 0)
        self.core.shutdown(max(deadline - time.monotonic(), 0.05))
        self._native_gone = True
        self._release_leftovers()
        return clean

    def _stop_reading(self):
        self.post(lib.QS_CMD_STOP_READ, 0, 0)

    def _release_leftovers(self):
        """Drop buffer references still queued once the stack thread is gone."""
        self._release_commands()
        # End the workers the way gevent would (from its loop, so each dying
        # greenlet returns to the hub, not to us); blocked handlers see
        # GreenletExit and hand their buffer back through _lead's except.
        # Wake-ups still queued for the scheduler are void: they die first.
        self.ordered = False
        ready = self._ready
        while ready.count:
            g, _ = ready.pop(ready.top())
            g._queued = False
        me = getcurrent()
        for g in list(self._workers):
            if not g.dead and g is not me:
                self._loop.run_callback(g.throw, gevent.GreenletExit)
        gevent.sleep(0)
        self._release_commands()
        leftovers = []
        for q in self._queues:
            leftovers.extend(q)
            q.clear()
        while True:
            n = self._poll(-1, self._evbuf, self._batch)
            if n <= 0:
                break
            leftovers.extend(iter_events(self._evview[:n * EVENT_SIZE]))
        for ev in leftovers:
            if ev[3]:
                self.core.release_local(ev[3])
