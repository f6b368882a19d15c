"""Stream mode: a greenlet per connection, gevent-StreamServer style.

One dispatcher greenlet drains the native rings and routes each event to its
connection's inbox, waking the connection's greenlet if it waits in recv().
Events of one connection arrive in order: data events may sit in any level's
ring, but ACCEPTED/EOF/CLOSED always travel in the lowest level's ring and
rings are drained highest first (see qstack.h), so a connection's data is
routed before its EOF.

Flow control both ways: an inbox longer than PAUSE_AT events pauses reading
that connection natively until recv() drains it below RESUME_AT; sendall()
waits while more than SEND_HIGH_WATER bytes it queued are unsent.
"""

import logging
from collections import deque

from greenlet import getcurrent, greenlet

from .errlog import handler_failed
from .hub import CLOSE, EV_DATA, EV_BIGDATA, RELEASE, SEND_COPY, Hub
from qstack.transport import EVENT_SIZE, iter_events, lib

__all__ = ["StreamHub"]

log = logging.getLogger("qstack")

ACCEPTED = lib.QS_EV_ACCEPTED
EOF = lib.QS_EV_EOF
CLOSED = lib.QS_EV_CLOSED
WRITABLE = lib.QS_EV_WRITABLE
PAUSE_AT = 64
RESUME_AT = 16
SEND_HIGH_WATER = 1 << 20


class _Stream:
    __slots__ = ("id", "inbox", "pos", "eof", "closed", "gone", "paused",
                 "unsent", "waiter", "greenlet")

    def __init__(self, conn_id):
        self.id = conn_id
        self.inbox = deque()
        self.pos = 0
        self.eof = self.closed = self.paused = False
        self.gone = False               # CLOSED seen: no more events will come
        self.unsent = 0
        self.waiter = None
        self.greenlet = None


class StreamHub(Hub):
    def __init__(self, core, handler, **kw):
        super().__init__(core, handler, **kw)
        self._streams = {}
        self._finished = set()          # handler done, CLOSED not seen yet

    def start(self):
        g = greenlet(self._dispatch, parent=self._ghub)
        self._workers.add(g)
        self._loop.run_callback(g.switch)

    def _dispatch(self):
        while not self._native_gone:
            if not self._refill() and not self._rq:
                self._wait_events()
                continue
            route = self._route
            pop = self._rq.pop
            ev = pop()
            while ev is not None:
                route(ev)
                ev = pop()
            self._yield()               # let the woken connections run

    def _refill(self):
        # One poll over every level: only that keeps a connection's data
        # ahead of its EOF/CLOSED (qs_core_poll reads the lower rings'
        # positions first).  Per-level polls could overtake.
        n = self._poll(-1, self._evbuf, self._batch)
        if n > 0:
            queues = self._queues
            for ev in iter_events(self._evview[:n * EVENT_SIZE]):
                queues[ev[1]].append(ev)
        return max(n, 0)

    def _route(self, ev):
        kind, conn = ev[0], ev[2]
        st = self._streams.get(conn)
        if st is None:
            # A connection's level-0 data can arrive before its ACCEPTED (which
            # travels in the lowest ring), so its first event of any kind
            # starts it -- unless its handler already finished.  CLOSED is
            # always a connection's last event.
            if conn in self._finished:
                if kind == CLOSED:
                    self._finished.discard(conn)
                if ev[3]:
                    self.post(RELEASE, ev[1], conn, ev[3])
                return
            st = self._streams[conn] = _Stream(conn)
            st.greenlet = greenlet(self._serve, parent=self._ghub)
            self._workers.add(st.greenlet)
            self._loop.run_callback(st.greenlet.switch, st)
        if kind == ACCEPTED:
            return
        if kind == EV_DATA or kind == EV_BIGDATA:
            st.inbox.append(ev)
            if len(st.inbox) > PAUSE_AT and not st.paused:
                st.paused = True
                self.post(lib.QS_CMD_PAUSE, ev[1], conn)
        elif kind == EOF:
            st.eof = True
        elif kind == CLOSED:
            st.closed = st.gone = True
        elif kind == WRITABLE:
            st.unsent = 0
        self._wake_stream(st)

    def _wake_stream(self, st):
        g = st.waiter
        if g is not None:
            st.waiter = None
            self._loop.run_callback(g.switch)

    def _serve(self, st):
        try:
            self._handler(self._make_connection(self, st.id))
        except Exception as exc:
            self.errors += 1
            handler_failed(self, st.id, exc, "stream handler")
        finally:
            self._workers.discard(getcurrent())
            self._streams.pop(st.id, None)
            if not st.gone:
                self._finished.add(st.id)
            for ev in st.inbox:
                self.post(RELEASE, ev[1], st.id, ev[3])
            st.inbox.clear()
            if not st.closed:
                self.post(CLOSE, self.send_level, st.id)

    def _block(self, st):
        st.waiter = getcurrent()
        try:
            self._ghub.switch()
        finally:
            st.waiter = None

    # -- the Connection API -------------------------------------------------

    def conn_recv(self, conn, bufsize):
        st = self._streams.get(conn)
        if st is None:
            return b""
        while not st.inbox:
            if st.eof or st.closed:
                return b""
            self._block(st)
        ev = st.inbox[0]
        view = self._view(ev)
        start, end = st.pos, min(ev[5], st.pos + bufsize)
        data = bytes(view[start:end])
        view.release()
        if end >= ev[5]:
            st.inbox.popleft()
            st.pos = 0
            self.post(RELEASE, ev[1], conn, ev[3])
        else:
            st.pos = end
        if st.paused and len(st.inbox) <= RESUME_AT:
            st.paused = False
            self.post(lib.QS_CMD_RESUME, ev[1], conn)
        return data

    def conn_send(self, conn, data, priority=None, wait=False):
        st = self._streams.get(conn)
        if st is not None and st.closed:
            raise ConnectionResetError(f"connection {conn:#x} is closed")
        level = self.send_level if priority is None else priority
        n = len(data)
        if not wait or st is None:
            self.post(SEND_COPY, level, conn, data=data)
            return n
        st.unsent += n
        notify = st.unsent > SEND_HIGH_WATER
        self.post(SEND_COPY, level, conn, data=data,
                  flags=lib.QS_F_NOTIFY if notify else 0)
        while notify and st.unsent and not st.closed:
            self._block(st)
        if st.closed:
            raise ConnectionResetError(f"connection {conn:#x} is closed")
        return n

    def conn_close(self, conn):
        st = self._streams.get(conn)
        if st is not None:
            if st.closed:
                return
            st.closed = True
        self.post(CLOSE, self.send_level, conn)

    def busy_workers(self):
        return len(self._streams)

    def _stop_reading(self):
        pass            # stream handlers finish their conversations in the grace period
