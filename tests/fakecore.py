"""A fake qs_core for in-process hub tests: the test says when messages
arrive, and every command the hub submits is recorded.

It offers what the hub uses of qstack.transport.NativeCore -- the five
data-path calls (poll, submit, pending_above, sleep_below, step), the slab,
the wake fd and the attributes the hub reads -- with the threaded stack's
wake-up rule: ``sleep_below(n)`` arms an eventfd that the next arrival at a
level below ``n`` writes.  Events and commands keep the ABI's shape (eight
int64s), so the hub's packing and unpacking run as in production.
"""

import os
import time
import struct
from collections import deque

from qstack.transport import ffi, lib

EVENT = struct.Struct("8q")
SEQ_SHIFT = 8


class Sent:
    """One recorded command."""

    __slots__ = ("op", "level", "conn", "buf", "data", "flags")

    def __init__(self, op, level, conn, buf, data, flags):
        self.op, self.level, self.conn, self.buf = op, level, conn, buf
        self.data, self.flags = data, flags

    @property
    def seq(self):
        return self.flags >> SEQ_SHIFT

    def __repr__(self):
        return f"<Sent op={self.op} level={self.level} conn={self.conn} {self.data!r}>"


class FakeCore:
    def __init__(self, levels=2, slot=256, slots=4096, numbered=True):
        self.levels = levels
        self.numbered = numbered        # False: reply order "completion" (aux 0)
        self.only_level = None
        self.inline = False
        self.stream = False
        self.needs_service = False
        self._mem = bytearray(slot * slots)
        self.slab = memoryview(self._mem)
        self._pin = ffi.from_buffer(self._mem)      # keeps the address valid
        self.slab_addr = int(ffi.cast("uintptr_t", self._pin))
        self._slot, self._slots, self._next = slot, slots, 0
        self.rings = [deque() for _ in range(levels)]
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._armed = None              # sleep_below's level while armed
        self._seq = {}
        self.sent = []
        self.bufs_out = set()           # buffer references the hub holds

    # -- the test's side --------------------------------------------------

    def arrive(self, conn, data, level):
        """A message on ``conn`` classified at ``level``; returns its seq
        (the stack's number for it on its conn: 1, 2, 3, ...)."""
        if len(data) > self._slot:
            raise ValueError("message larger than a fake pool slot")
        buf = self._next % self._slots + 1
        self._next += 1
        off = (buf - 1) * self._slot
        self._mem[off:off + len(data)] = data
        seq = self._seq.get(conn, 0) + 1
        self._seq[conn] = seq
        self.bufs_out.add(buf)
        self.rings[level].append((lib.QS_EV_DATA, level, conn, buf, off, len(data),
                                  1, seq << SEQ_SHIFT if self.numbered else 0))
        if self._armed is not None and level < self._armed:
            self._armed = None
            os.eventfd_write(self.wake_fd, 1)
        return seq

    def replies(self, conn=None):
        """Reply payloads in the order the hub submitted them."""
        return [s.data for s in self.sent
                if s.op in (lib.QS_CMD_SEND_BUF, lib.QS_CMD_SEND_COPY)
                and (conn is None or s.conn == conn)]

    # -- what the hub calls -----------------------------------------------

    def poll(self, level, out, most):
        view = ffi.buffer(out)
        rings = self.rings if level < 0 else [self.rings[level]]
        n = 0
        for ring in rings:
            while ring and n < most:
                EVENT.pack_into(view, n * EVENT.size, *ring.popleft())
                n += 1
        return n

    def submit(self, cmds, n, staging):
        raw = bytes(ffi.buffer(cmds, n * EVENT.size))
        stage = bytes(ffi.buffer(staging)) if staging != ffi.NULL else b""
        for op, level, conn, buf, off, ln, _t_rx, flags in EVENT.iter_unpack(raw):
            if op == lib.QS_CMD_SEND_BUF:
                data = bytes(self._mem[off:off + ln])
            elif op == lib.QS_CMD_SEND_COPY:
                data = stage[off:off + ln]
            else:
                data = None
            if buf:
                self.bufs_out.discard(buf)
            self.sent.append(Sent(op, level, conn, buf, data, flags))
        return n

    def pending_above(self, level):
        return sum(len(r) for r in self.rings[:max(level, 0)])

    def sleep_below(self, below):
        if self.pending_above(below):
            return 1
        self._armed = below
        return 0

    def step(self, timeout):
        return 0

    def peer(self, conn):
        return ("127.0.0.1", 40000 + conn % 1000) if conn > 0 else None

    def release_local(self, buf):
        self.bufs_out.discard(buf)

    def shutdown(self, grace_s):
        pass

    def close(self):
        os.close(self.wake_fd)


class InlineFakeCore(FakeCore):
    """The inline layout: no stack thread, the hub reads "the sockets" itself
    with step().  Messages wait on a wire until a step moves them into the
    rings, at most ``chunk`` per step (a step reads a bounded batch of frames);
    each step that moves something costs ``step_cost`` seconds of CPU, as
    reading a thousand frames does.  ``log`` records ("step", [names]) and,
    through note(), whatever the test's handler adds, in order."""

    def __init__(self, levels=2, chunk=8, step_cost=0.0, **kw):
        super().__init__(levels=levels, **kw)
        self.inline = True
        self.wire = deque()
        self.chunk, self.step_cost = chunk, step_cost
        self.log = []

    def send(self, conn, data, level):
        """A message reaches the wire; the hub sees it at its next step."""
        self.wire.append((conn, data, level))
        os.eventfd_write(self.wake_fd, 1)       # the poll fd turns readable

    def note(self, what):
        self.log.append(what)

    def step(self, timeout):
        if timeout == lib.QS_STEP_NO_POLL or not self.wire:
            return 0
        moved = []
        while self.wire and len(moved) < self.chunk:
            conn, data, level = self.wire.popleft()
            self.arrive(conn, data, level)
            moved.append(data)
        if not self.wire:
            try:
                os.eventfd_read(self.wake_fd)
            except BlockingIOError:
                pass
        self.log.append(("step", moved))
        until = time.monotonic() + self.step_cost
        while time.monotonic() < until:
            pass
        return len(moved)


class ReapingInlineCore(InlineFakeCore):
    """InlineFakeCore as the uring backend behaves, with the addresses a
    native core offers: the step that sends the replies (NO_POLL) also
    takes what reached the wire, and submit, step and poll are C function
    pointers (cffi callbacks into the methods above), so the hub's C lane
    (qslane.c) calls them as it calls qs_core_submit/step/poll."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._cbs = [
            ffi.callback("int(void *, qs_cmd *, int, uint8_t *)",
                         lambda _c, cmds, n, staging: self.submit(cmds, n, staging)),
            ffi.callback("int(void *, int)", lambda _c, timeout: self.step(timeout)),
            ffi.callback("int(void *, int, qs_event *, int)",
                         lambda _c, level, out, most: self.poll(level, out, most)),
        ]
        addr = [int(ffi.cast("uintptr_t", cb)) for cb in self._cbs]
        self.submit_address = (1, addr[0])
        self.stack_address = (1, addr[1], addr[2])

    def step(self, timeout):
        if timeout == lib.QS_STEP_NO_POLL:
            timeout = 0                 # the enter that sends also reaps
        return super().step(timeout)
