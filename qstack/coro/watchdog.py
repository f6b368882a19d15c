"""The blocked-hub watchdog: say which handler keeps a core from running.

A handler that blocks without yielding to gevent (``time.sleep(10)``, a
non-cooperative socket, a long computation) stops its whole core: no other
request is read, no timer fires.  Nothing else would say so.  This is
gevent's ``max_blocking_time`` monitor, made cheaper for a hub that runs
requests without switching greenlets:

- *Progress* is libev's own loop counter (``loop.iteration``, bumped by
  libev each time the loop polls): nothing is added per request or per
  loop turn.  While the hub serves, the loop polls at least every few
  milliseconds (the leader yields every ``YIELD_AFTER`` and gevent
  polls between callback batches after a switch interval).  A loop without
  that counter (libuv) gets a prepare watcher that bumps one: one Python
  call per loop turn, still none per request.
- *Idle is not blocked*: a loop waiting in epoll polls no more either.  The
  hub thread's current Python frame tells them apart: while the loop waits
  it is gevent's ``Hub.run`` (the loop itself is C); anything else is code
  running on the hub's thread -- a worker greenlet inside its handler, or a
  callback.  ``quiet`` adds frames where the hub waits on purpose (the core
  flushing its last replies at stop).
- A real thread (the original ``_thread``, even under monkey patching)
  wakes every ``threshold / 4`` seconds, reads the counter and, only if it
  has not moved, the hub thread's frame (``sys._current_frames()``).  Once
  the counter stays put for ``threshold`` seconds while the frame is busy,
  the stack is logged, once per occurrence: the next warning needs the loop
  to have turned (or idled) in between.  A block shorter than ``threshold``
  is never reported; one is reported at most ``threshold + threshold / 2``
  after it began.

Logging from a thread is safe while logging's locks are real ones.  An app
that calls ``gevent.monkey.patch_all()`` swaps them for gevent's, which a
foreign thread must not wait on: then the lines are formatted by the
handlers' own formatters and written to their streams' file descriptors
directly, as gevent's own monitor writes to its stream.

Limits.  The thread needs the GIL: a handler blocked in C code that holds
it (a C extension that does not release it) cannot be reported until it
returns.  Sampling takes the GIL from a busy hub about 40 times a second for
a few microseconds.  Blocking the *stack* thread is not watched here.
"""

import logging
import os
import sys
import time
import traceback

from gevent.hub import Hub as _GeventHub
from gevent.monkey import get_original, is_module_patched

__all__ = ["BlockWatchdog"]

log = logging.getLogger("qstack")

_start_thread = get_original("_thread", "start_new_thread")
_get_ident = get_original("_thread", "get_ident")
_sleep = get_original("time", "sleep")
_IDLE = _GeventHub.run.__code__
STACK_LIMIT = 30        # innermost frames shown


class BlockWatchdog:
    """Watches the calling thread's gevent loop from a thread of its own."""

    def __init__(self, loop, threshold, label="hub", quiet=(), clock=time.monotonic):
        self.threshold = threshold
        self.label = label
        self.blocks = 0             # occurrences reported
        self._tid = _get_ident()    # the hub's thread: the one creating us
        self._idle = {_IDLE, *quiet}
        self._clock = clock
        self._stopped = False
        self._prepare = None
        self._turns = 0
        if hasattr(loop, "iteration"):
            self._read = lambda: loop.iteration
        else:
            self._prepare = loop.prepare(ref=False)
            self._prepare.start(self._bump)
            self._read = lambda: self._turns

    def _bump(self):
        self._turns += 1

    def start(self):
        _start_thread(self._watch, ())
        return self

    def stop(self):
        self._stopped = True
        if self._prepare is not None:
            self._prepare.close()
            self._prepare = None

    def _watch(self):
        period = min(max(self.threshold / 4, 0.005), 1.0)
        clock, read = self._clock, self._read
        last, since, said = None, clock(), None
        while not self._stopped:
            _sleep(period)
            if self._stopped:
                break
            now, turns = clock(), read()
            if turns != last:
                if said is not None:
                    _emit(logging.INFO, "%s: the hub is back after about %.2f s",
                          self.label, now - said)
                last, since, said = turns, now, None
                continue
            if said is not None:
                continue                            # said once for this block
            frame = sys._current_frames().get(self._tid)
            if frame is None or frame.f_code in self._idle:
                since = now                         # waiting, not blocked
                continue
            if now - since >= self.threshold:
                said = since
                self.blocks += 1
                self._say(frame, now - since)
            del frame

    def _say(self, frame, seconds):
        stack = traceback.format_stack(frame)[-STACK_LIMIT:]
        _emit(logging.WARNING, "%s: the hub has not come back for %.3f s "
              "(server.block_warning is %g s); blocked in:\n%s", self.label, seconds,
              self.threshold, "".join(stack).rstrip("\n"))


def _emit(level, msg, *args):
    """log.log(level, ...) from the watchdog's thread (see the module essay)."""
    if not log.isEnabledFor(level):
        return
    if not is_module_patched("threading"):
        log.log(level, msg, *args)
        return
    record = log.makeRecord(log.name, level, __file__, 0, msg, args, None)
    logger = log
    while logger is not None:
        for h in logger.handlers:
            stream = getattr(h, "stream", None)
            if stream is None or level < h.level:
                continue
            try:
                stream.flush()
                os.write(stream.fileno(), (h.format(record) + "\n").encode(errors="replace"))
            except (OSError, ValueError, AttributeError):
                pass                    # not a file (a test's capture): skip it
        logger = logger.parent if logger.propagate else None
