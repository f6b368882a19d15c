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
runs callbacks only when its hub greenlet gets control, which happens only if
the leader switched away.  If the leader switched away on purpose (to wait
for events or to give the loop a turn), ``_parked`` is set and the callback
just lapses; otherwise the leader is blocked inside a handler and the callback
promotes a follower.  A worker whose handler returns after it lost leadership
becomes a follower again (or the leader, if nobody leads: all were blocked).

Priority.  Native rings are per level and polled highest first into a
:class:`RunQueue`.  Before running a request of level L > 0 the leader checks
(one cheap native call) whether anything of a higher level waits natively and
refills first, so a high request never waits behind a queued low one.

Fairness with gevent.  While there is work the leader drains the rings
without going through gevent's loop; every ``YIELD_EVERY`` requests it gives
the loop one turn so timers and handlers that were blocked can resume.  When
the rings are empty it sleeps on the core's eventfd through gevent's loop.

Commands (replies, buffer returns) collect as tuples in a list (appending is
the cheapest thing Python does; array.extend of a tuple costs 10x more) plus a
staging bytearray for copied replies, and reach C packed, in one call per
batch.  A reply that is the request's
own buffer is sent without a copy; because QS_EV_DATA == QS_CMD_SEND_BUF and
the layouts match, such an event tuple *is* its own command.
"""

import logging
import os
import time
from itertools import starmap
from struct import Struct

import gevent
from gevent import get_hub
from greenlet import getcurrent, greenlet

from .native import EVENT_SIZE, iter_events, jumbo_view, lib, ffi
from .runqueue import RunQueue

__all__ = ["Hub"]

log = logging.getLogger("qstack")

EV_DATA = lib.QS_EV_DATA
EV_BIGDATA = lib.QS_EV_BIGDATA
SEND_BUF = lib.QS_CMD_SEND_BUF
SEND_COPY = lib.QS_CMD_SEND_COPY
DONE = lib.QS_CMD_DONE
RELEASE = lib.QS_CMD_RELEASE
CLOSE = lib.QS_CMD_CLOSE
F_CLOSE = lib.QS_F_CLOSE
NO_POLL = lib.QS_STEP_NO_POLL
assert EV_DATA == SEND_BUF

YIELD_EVERY = 64
HOT_BATCH = 4       # inline: a refill this big means more is coming; poll at once
_pack_cmd = Struct("8q").pack


class Hub:
    """Runs one core's handlers: start() puts the workers on gevent's loop,
    drain() finishes the work in hand and stops the native core."""

    def __init__(self, core, handler, *, workers=64, low_share=0.0,
                 classifier=None, batch=128, make_request, make_connection,
                 send_level=None):
        self.core = core
        self._c = core.ptr
        self._slab = core.slab
        self._handler = handler
        self._levels = core.levels
        self._rq = RunQueue(core.levels, low_share)
        self._queues = self._rq.queues
        self._classifier = classifier
        self._polled = list(enumerate(self._queues))
        if core.only_level is not None and classifier is None and not core.stream:
            # Every message gets one level (no rule): one ring to poll.
            self._only = self._queues[core.only_level]
            self._next = self._next_only
            self._polled = [(core.only_level, self._only)]
        self._batch = batch
        self._evbuf = ffi.new("qs_event[]", batch)
        self._evview = memoryview(ffi.buffer(self._evbuf))
        self._cmds = []                 # command tuples, packed once per flush
        self._tx = bytearray()
        self._make_request = make_request
        self._make_connection = make_connection
        self.send_level = core.levels - 1 if send_level is None else send_level
        self._ghub = get_hub()
        self._loop = self._ghub.loop
        self._inline = core.inline
        self._hot = False
        self._wake = self._loop.io(core.wake_fd, 1)
        # Inline user-space stack: whoever else sleeps, the stack must run
        # (a SYN, an ACK, a timer) -- also while every worker is blocked in
        # a handler and no leader waits on the fd.
        self._service = (self._loop.io(core.wake_fd, 1)
                         if core.inline and core.needs_service else None)
        self._nworkers = workers
        self._workers = set()
        self._idle = []
        self._leader = None
        self._parked = False
        self._sleeper = None            # the leader, while it sleeps in _wait_events
        self._armed = False
        self._flush_scheduled = False
        self._native_gone = False
        self.errors = 0

    # -- rings ------------------------------------------------------------

    def _refill(self):
        """Move waiting events from the native rings into the run queue."""
        c, buf, view, batch = self._c, self._evbuf, self._evview, self._batch
        if self._inline:
            # Replies out; while busy also read the sockets right away, else
            # leave that to gevent's epoll_wait (see _wait_events).
            self._flush()
            if self._hot:
                lib.qs_core_step(c, 0)
        moved = 0
        for level, q in self._polled:
            n = lib.qs_core_poll(c, level, buf, batch)
            if n:
                moved += n
                if self._classifier is None:
                    q.extend(iter_events(view[:n * EVENT_SIZE]))
                else:
                    self._classify(iter_events(view[:n * EVENT_SIZE]))
        self._hot = moved >= HOT_BATCH
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

    def _next_only(self):
        """_next when every message has the same level (no rule, no classifier)."""
        q = self._only
        if not q:
            self._refill()
            if not q:
                return None
        return q.popleft()

    def _next(self):
        """The next event by priority, refilling from the rings as needed."""
        queues = self._queues
        if not queues[0]:
            top = 1
            while top < self._levels and not queues[top]:
                top += 1
            if top == self._levels or lib.qs_core_pending_above(self._c, top):
                self._refill()
        return self._rq.pop()

    def queued(self):
        """Requests taken from the rings and waiting for a worker, per level."""
        return [len(q) for q in self._queues]

    def pending(self):
        return len(self._rq) + lib.qs_core_pending_above(self._c, self._levels)

    # -- commands ---------------------------------------------------------

    def _flush(self):
        """Hand every queued command to the stack thread in one call."""
        cmds = self._cmds
        if not cmds:
            return
        if self._native_gone:
            self._release_commands()
            return
        n = len(cmds)
        tx = self._tx
        with ffi.from_buffer("qs_cmd[]", b"".join(starmap(_pack_cmd, cmds))) as p:
            if tx:
                with ffi.from_buffer(tx) as s:
                    done = lib.qs_core_submit(self._c, p, n, s)
            else:
                done = lib.qs_core_submit(self._c, p, n, ffi.NULL)
        if done == n:
            del cmds[:]
            del tx[:]
            if self._inline:
                self._step(NO_POLL)
        else:
            # A command ring is full: keep the rest (their staging offsets
            # stay valid until everything is taken) and retry shortly.
            del cmds[:max(done, 0)]
            timer = self._loop.timer(0.0002)
            timer.start(self._flush_later, timer)

    def _step(self, timeout):
        """Inline stack: run one step now (NO_POLL: just the commands).

        A step may publish events (a read, or a connection that was waiting
        for ring space) while the leader sleeps on the epoll fd: wake it.
        """
        if lib.qs_core_step(self._c, timeout) > 0 and self._sleeper is not None:
            self._loop.run_callback(self._kick)

    def _flush_later(self, timer):
        timer.close()
        self._flush()

    def _release_commands(self):
        """After the stack thread is gone: drop the buffers commands name."""
        cmds = self._cmds
        for cmd in cmds:
            if cmd[3]:
                self.core.release_local(cmd[3])
        del cmds[:]
        del self._tx[:]

    def post(self, op, level, conn, buf=0, data=b"", flags=0, t_rx=0):
        """Queue a command from anywhere (not the leader's hot path)."""
        off = len(self._tx)
        if data:
            self._tx += data
        self._cmds.append((op, level, conn, buf, off, len(data), t_rx, flags))
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
            if lib.qs_core_sleep(self._c) == 0:
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

    def _serve_stack(self):
        if self._sleeper is None and not self._native_gone:
            self._step(0)

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

    def wake(self):
        """Wake a sleeping leader (used by drain())."""
        if not self._inline:
            os.eventfd_write(self.core.wake_fd, 1)

    # -- message workers ----------------------------------------------------

    def _arm(self):
        if not self._armed:
            self._armed = True
            self._loop.run_callback(self._on_turn)

    def _on_turn(self):
        """gevent's hub got control: if the leader is blocked, promote."""
        self._armed = False
        if self._parked or self._leader is None:
            return
        self._flush()
        self._leader = None
        if self._idle:
            g = self._idle.pop()
            self._leader = g
            g.switch()

    def _worker(self):
        me = getcurrent()
        req = self._make_request(self)
        while not self._native_gone:
            if self._leader is None:
                self._leader = me
            elif self._leader is not me:
                self._idle.append(me)
                self._ghub.switch()     # parked until _on_turn promotes us
                continue
            self._lead(me, req)

    def _lead(self, me, req):
        """Run requests while we lead.  The hot loop of qstack: every name it
        uses per request is a local, and the handler runs in this frame."""
        self._arm()
        handler, slab, cmds, nxt = self._handler, self._slab, self._cmds, self._next
        handled = 0
        while not self._native_gone:
            ev = nxt()
            if ev is None:
                self._wait_events()
                self._arm()
                continue
            kind, level, conn, buf, off, ln, t_rx, seq = ev
            data = slab[off:off + ln] if kind == EV_DATA else jumbo_view(off, ln)
            req.data = data
            req.priority = level
            req.conn_id = conn
            req.seq = seq           # already << QS_SEQ_SHIFT: a flags word
            try:
                out = handler(req)
                if out is data:
                    cmds.append(ev if kind == EV_DATA else
                                (SEND_BUF, level, conn, buf, off, ln, t_rx, seq))
                elif out is None:
                    cmds.append((DONE, level, conn, buf, 0, 0, 0, seq))
                else:
                    tx = self._tx
                    pos = len(tx)
                    tx += out
                    cmds.append((SEND_COPY, level, conn, buf, pos, len(tx) - pos, t_rx, seq))
            except Exception as exc:
                self._handler_failed(conn, exc)
                cmds.append((DONE, level, conn, buf, 0, 0, 0, seq | F_CLOSE))
            except BaseException:
                cmds.append((DONE, level, conn, buf, 0, 0, 0, seq | F_CLOSE))
                raise
            finally:
                req.data = None
                try:
                    data.release()
                except BufferError:
                    pass                # the handler still exports it
            if self._leader is not me:
                # We blocked and a follower took over; it may be asleep on
                # the eventfd, so our reply must not wait for its next batch.
                self._schedule_flush()
                return
            handled += 1
            if handled >= YIELD_EVERY:
                handled = 0
                self._yield()
                self._arm()

    def _handler_failed(self, conn, exc):
        self.errors += 1
        if isinstance(exc, TypeError) and "bytearray" in str(exc):
            log.error("handler returned a non-bytes reply; closing connection %#x", conn)
        else:
            log.exception("handler raised; closing connection %#x", conn)

    # -- the Connection API (message mode) ----------------------------------

    def conn_send(self, conn, data, priority=None, wait=False, slot=None):
        """slot: (seq, level) of the request of this connection the caller
        serves (Request.conn), or None: the bytes go out in that request's
        place, at its level or higher, so they stay ahead of its reply."""
        if slot is None:
            level = self.send_level if priority is None else priority
            self.post(SEND_COPY, level, conn, data=data)
        else:
            seq, level = slot
            if priority is not None and priority < level:
                level = priority
            self.post(SEND_COPY, level, conn, data=data, flags=seq)
        return len(data)

    def conn_close(self, conn, slot=None):
        """slot as for conn_send: close right after that request's reply."""
        self.post(CLOSE, self.send_level, conn, flags=slot[0] if slot else 0)

    def conn_recv(self, conn, bufsize):
        raise TypeError("recv() is for stream handlers (mark the handler with @qstack.stream)")

    def busy_workers(self):
        """Workers inside a handler (for graceful shutdown)."""
        idle = len(self._idle) + (1 if self._leader is not None and self._parked else 0)
        return len(self._workers) - idle

    # -- lifecycle ------------------------------------------------------------

    def start(self):
        for _ in range(self._nworkers):
            g = greenlet(self._worker, parent=self._ghub)
            self._workers.add(g)
            self._loop.run_callback(g.switch)
        if self._service is not None:
            self._service.start(self._serve_stack)

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
            gevent.sleep(0.005)
        self._flush()
        if self._service is not None:
            self._service.stop()
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
            n = lib.qs_core_poll(self._c, -1, self._evbuf, self._batch)
            if n <= 0:
                break
            leftovers.extend(iter_events(self._evview[:n * EVENT_SIZE]))
        for ev in leftovers:
            if ev[3]:
                self.core.release_local(ev[3])
