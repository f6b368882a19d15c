"""Failures said, and said with measure: rate-limited error lines.

A handler that fails on every request used to log one traceback per request
(27,000 lines in 1.1 s), which buries everything else in the log and costs
the core more than the requests themselves.  Here the first ``BURST``
failures of each ``INTERVAL`` are logged in full; the rest are only counted,
and one line says how many were left out ("195 more handler errors in the
last 10 s") when the interval ends (a timer on the loop) or the core stops.
Nothing is lost from the counts: ``Hub.errors`` still counts every failure.

Counters the native layer keeps (protocol errors, accept errors) cannot
call into Python when they happen -- no C thread takes the GIL -- so
:class:`CounterWatch` turns their increase into a line instead: the first
increase is said at the next check, later ones at most once per ``quiet``
seconds, each line giving the count since the previous one and the total.

:class:`RateLimit` and :class:`CounterWatch` are pure (time is passed in)
and tested without a loop; :class:`HandlerErrors` puts the first on the loop.
"""

import logging
import re
from time import monotonic

__all__ = ["BURST", "INTERVAL", "CounterWatch", "HandlerErrors", "RateLimit",
           "handler_failed", "peer_name"]

log = logging.getLogger("qstack")

BURST = 5           # handler failures logged in full per interval
INTERVAL = 10.0     # seconds


class RateLimit:
    """At most ``burst`` events said in full per window of ``interval``
    seconds; the others are held (counted) until the window ends."""

    def __init__(self, burst=BURST, interval=INTERVAL):
        self.burst = burst
        self.interval = interval
        self.start = None           # when the current window began
        self._said = 0
        self.held = 0               # events not said in the current window

    def hit(self, now):
        """One event at ``now``: True if it is to be said in full.

        Take the previous window's held count (:meth:`due`) first: a new
        window starts here once the old one is over.
        """
        if self.start is None or now - self.start >= self.interval:
            self.start, self._said = now, 0
        if self._said < self.burst:
            self._said += 1
            return True
        self.held += 1
        return False

    def due(self, now, force=False):
        """``(held, seconds)`` once the window is over (or ``force``), then
        forgotten; ``(0, 0.0)`` if nothing is held or the window runs on."""
        if not self.held or not (force or now - self.start >= self.interval):
            return 0, 0.0
        held, self.held = self.held, 0
        return held, min(now - self.start, self.interval)

    def ends_in(self, now):
        """Seconds until the current window ends."""
        return max(self.start + self.interval - now, 0.0)


# bytearray += x says "can't concat str to bytearray": the reply's type.
_CONCAT = re.compile(r"can't concat (\S+) to bytearray")


def reply_type(exc):
    """The type name of a reply the hub could not send, or None when ``exc``
    is not that (it came from the handler itself)."""
    if not isinstance(exc, TypeError):
        return None
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    # Raised in the hub's own frame (copying the reply), not in the handler;
    # or by the hub's C lane (qslane.c), which leaves no traceback.
    if tb is not None and not tb.tb_frame.f_globals.get("__name__", "").startswith("qstack.coro"):
        return None
    m = _CONCAT.search(str(exc))
    if m:
        return m.group(1)
    return "unknown" if "bytearray" in str(exc) else None


def peer_name(peer):
    """``(host, port)`` as ``host:port`` (``[host]:port`` for IPv6), or None."""
    if not peer:
        return None
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _conn_hex(conn):
    return f"connection {conn:#x}"


class HandlerErrors:
    """One core's handler failures, logged through a :class:`RateLimit`; a
    loop timer says the held count when the window ends."""

    def __init__(self, loop, what="handler", burst=BURST, interval=INTERVAL,
                 clock=monotonic, name=_conn_hex):
        self._loop = loop
        self._what = what
        self._name = name           # conn id -> "127.0.0.1:40000" (its peer)
        self._limit = RateLimit(burst, interval)
        self._clock = clock
        self._timer = None

    def failed(self, conn, exc):
        now = self._clock()
        self._say_held(now)
        if not self._limit.hit(now):
            if self._timer is None:
                # libev's clock is cached since its last poll: refresh it, or
                # the timer fires early (the count is then said early: fine).
                self._loop.update_now()
                self._timer = self._loop.timer(self._limit.ends_in(now) + 0.01)
                self._timer.start(self._on_timer)
            return
        rtype = reply_type(exc)
        if rtype is not None:
            log.error("%s returned a non-bytes reply (%s; a reply must be bytes, "
                      "bytearray, memoryview or None); closing %s",
                      self._what, rtype, self._name(conn))
        else:
            log.error("%s raised; closing %s", self._what, self._name(conn),
                      exc_info=(type(exc), exc, exc.__traceback__))

    def _on_timer(self):
        self._timer.close()
        self._timer = None
        self._say_held(self._clock(), force=True)

    def _say_held(self, now, force=False):
        held, seconds = self._limit.due(now, force)
        if held:
            log.error("%d more %s errors in the last %s s (only the first %d of "
                      "each %g s are logged in full)", held, self._what,
                      f"{seconds:.0f}" if seconds >= 9.95 else f"{seconds:.1f}",
                      self._limit.burst, self._limit.interval)

    def flush(self):
        """Say what is held now (the core is stopping)."""
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self._say_held(self._clock(), force=True)


def handler_failed(hub, conn, exc, what="handler"):
    """Log a handler failure of ``hub`` with measure (its HandlerErrors,
    made on the first failure, is kept as ``hub.said``)."""
    said = getattr(hub, "said", None)
    if said is None:
        said = hub.said = HandlerErrors(hub._loop, what,
                                        name=getattr(hub, "conn_name", _conn_hex))
    said.failed(conn, exc)


class CounterWatch:
    """Turns the increase of a native counter into a log line, at most once
    per ``quiet`` seconds (the first increase is said at once)."""

    def __init__(self, text, detail="", quiet=INTERVAL, start=0):
        self.text = text            # what is counted: "protocol errors"
        self.detail = detail        # what that means, after the counts
        self.quiet = quiet
        self._said = start          # the value the last line accounted for
        self._at = None             # when that line was said

    def update(self, value, now, force=False, peer=None):
        """The line to log for the counter's value at ``now``, or None.
        ``peer()``, asked only when there is a line, names the peer of the
        latest occurrence ("127.0.0.1:40000") or says None."""
        if value <= self._said:
            self._said = min(self._said, value)     # a counter never goes back; be safe
            return None
        if not force and self._at is not None and now - self._at < self.quiet:
            return None
        new, self._said, self._at = value - self._said, value, now
        detail = f": {self.detail}" if self.detail else ""
        last = peer() if peer is not None else None
        last = f"; the last from {last}" if last else ""
        return f"{new} new {self.text} ({value} since the core started{last}){detail}"
