"""Tests of the native core (qstack/native): its ABI, and the connection
layer on every backend through the production binding, NativeCore.

Pure parts (framing, rules, latency buckets) are driven in-process and
deterministically.  The connection layer (framing on the wire, events,
backpressure, reply order, out queues, graceful close) is driven over real
sockets with Linux's TCP as the peer, on every backend (the `backend`
fixture: kernel sockets, and the user-space stack on a TAP device in a
namespace), with Python playing the hub: poll events, submit commands, check
every byte.  Every wait is bounded in both count and time.  Each core is
checked at teardown: after shutdown and releasing what the test held, no
buffer may be left in use and no conn open.

The socket tests run in both layouts (the `layout` fixture): "threaded" (a
stack thread; the hub sleeps on the wake fd) and "inline" (no stack thread:
whoever waits drives the stack with NativeCore.step, as the hub does).
"""

import collections
import errno
import os
import random
import select
import socket
import struct
import threading
import time

import pytest

from conftest import ensure_built  # noqa: E402
from netns import STACK_IP, TapNetns, why_not

ensure_built("_native", "build.py", "src", "qstack.h")

# The binding under test: the one import to change when it moves (issue 11).
from qstack.transport import NativeCore, ffi, lib, open_core  # noqa: E402

EV = struct.Struct("8q")
DATA, BIGDATA = lib.QS_EV_DATA, lib.QS_EV_BIGDATA


# ---------------------------------------------------------------- framing

def framer(kind, arg=0, max_message=1 << 20):
    f = ffi.new("qs_framer *")
    f.kind, f.arg, f.max_message = kind, arg, max_message
    return f


def scan(f, data):
    mo, ml, need = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
    r = lib.qs_frame_scan(f, data, len(data), mo, ml, need)
    return r, mo[0], ml[0], need[0]


def scan_all(f, data):
    """Scan like the stack does: from the message start, again and again."""
    msgs, pos = [], 0
    while True:
        r, mo, ml, need = scan(f, data[pos:])
        if r < 0:
            return msgs, r, need
        if r == 0:
            return msgs, pos, need
        msgs.append(data[pos + mo:pos + mo + ml])
        pos += r


def length_msg(payload, h):
    return len(payload).to_bytes(h, "big") + payload


def check_prefixes(f, stream, expected, hdr=0):
    """Feed every prefix of stream: the complete messages come out, the rest
    is reported as partial with the right `need` where it is known."""
    bounds, pos = [], 0
    for m in expected:
        pos += hdr + len(m)
        bounds.append(pos)
    for p in range(len(stream) + 1):
        msgs, consumed, need = scan_all(f, stream[:p])
        done = [b for b in bounds if b <= p]
        assert msgs == expected[:len(done)], p
        assert consumed == (done[-1] if done else 0)
        if p < len(stream) and consumed < p:
            nxt = bounds[len(done)] - consumed
            if f.kind == lib.QS_FRAME_FIXED:
                assert need == f.arg
            elif f.kind == lib.QS_FRAME_LENGTH:
                assert need == (nxt if p - consumed >= hdr else 0)
            else:
                assert need == 0


def test_frame_raw():
    f = framer(lib.QS_FRAME_RAW)
    assert scan(f, b"") [0] == 0
    for n in (1, 7, 300):
        r, mo, ml, need = scan(f, b"x" * n)
        assert (r, mo, ml) == (n, 0, n)


def test_frame_line_every_split():
    f = framer(lib.QS_FRAME_LINE, max_message=64)
    msgs = [b"a\n", b"\n", b"hello world\n", b"x" * 63 + b"\n", b"last\n"]
    check_prefixes(f, b"".join(msgs), msgs)


def test_frame_line_too_long():
    f = framer(lib.QS_FRAME_LINE, max_message=8)
    assert scan(f, b"1234567\n")[0] == 8          # exactly max_message: fine
    assert scan(f, b"1234567")[0] == 0            # may still end in time
    assert scan(f, b"12345678")[0] == -errno.EMSGSIZE
    assert scan(f, b"12345678\n")[0] == -errno.EMSGSIZE


def test_frame_fixed_every_split():
    f = framer(lib.QS_FRAME_FIXED, 5)
    msgs = [bytes([i]) * 5 for i in range(6)]
    check_prefixes(f, b"".join(msgs), msgs)
    assert scan(framer(lib.QS_FRAME_FIXED, 5, max_message=4), b"12345")[0] == -errno.EMSGSIZE


@pytest.mark.parametrize("h", [1, 2, 4, 8])
def test_frame_length_every_split(h):
    f = framer(lib.QS_FRAME_LENGTH, h, max_message=200)
    msgs = [b"", b"a", b"hello", bytes(range(200)), b"z" * 17]
    check_prefixes(f, b"".join(length_msg(m, h) for m in msgs), msgs, hdr=h)
    r, mo, ml, need = scan(f, length_msg(b"abc", h))
    assert (r, mo, ml) == (h + 3, h, 3)
    r, mo, ml, need = scan(f, length_msg(b"abc", h)[:-1])
    assert (r, need) == (0, h + 3)
    assert scan(f, (201).to_bytes(h, "big"))[0] == -errno.EMSGSIZE


def test_frame_length_max_header():
    f = framer(lib.QS_FRAME_LENGTH, 8, max_message=1 << 40)
    assert scan(f, b"\xff" * 8)[0] == -errno.EMSGSIZE
    assert scan(f, (1 << 40).to_bytes(8, "big"))[:4] == (0, 0, 0, 8 + (1 << 40))


def test_frame_bad_args():
    assert scan(framer(lib.QS_FRAME_LENGTH, 3), b"abcdef")[0] == -errno.EINVAL
    assert scan(framer(lib.QS_FRAME_FIXED, 0), b"abcdef")[0] == -errno.EINVAL
    assert scan(framer(17), b"abcdef")[0] == -errno.EINVAL


def test_header_len():
    assert lib.qs_frame_header_len(framer(lib.QS_FRAME_LENGTH, 4)) == 4
    assert lib.qs_frame_header_len(framer(lib.QS_FRAME_LENGTH, 2)) == 2
    for k in (lib.QS_FRAME_RAW, lib.QS_FRAME_LINE):
        assert lib.qs_frame_header_len(framer(k)) == 0
    assert lib.qs_frame_header_len(framer(lib.QS_FRAME_FIXED, 4)) == 0


# ---------------------------------------------------------------- rules, histogram

def rules(*rs):
    arr = ffi.new("qs_rule[8]")
    for i, (offset, mask, value, level) in enumerate(rs):
        arr[i].offset, arr[i].mask, arr[i].value, arr[i].level = offset, mask, value, level
    return arr, len(rs)


def test_classify():
    arr, n = rules((5, 0xff, 1, 0), (0, 0xf0, 0x40, 2), (0, 0xff, ord("A"), 3))
    cl = lambda m: lib.qs_classify(arr, n, 1, m, len(m))  # noqa: E731
    assert cl(b"\x00\x00\x00\x00\x00\x01") == 0
    assert cl(b"A\x00\x00\x00\x00\x01") == 0        # first match wins
    assert cl(b"A") == 2                            # 0x41 & 0xf0 == 0x40 wins before 'A'
    assert cl(b"\x4f") == 2
    assert cl(b"\x00\x00\x00\x00\x00") == 1         # too short for offset 5
    assert cl(b"") == 1
    assert cl(b"\x30\x00\x00\x00\x00\x02") == 1
    assert lib.qs_classify(arr, 0, 7, b"A", 1) == 7


def test_lat_buckets():
    n = lib.QS_LAT_BUCKETS
    uppers = [lib.qs_lat_bucket_upper(i) for i in range(n)]
    assert all(a < b for a, b in zip(uppers, uppers[1:]))
    for i in range(n - 1):
        assert lib.qs_lat_bucket(uppers[i]) == i
        assert lib.qs_lat_bucket(uppers[i] + 1) == i + 1
    for v in (0, 1, 7, 8, 9, 15, 16, 17, 1000, 10 ** 6, 10 ** 9, 2 ** 40):
        b = lib.qs_lat_bucket(v)
        assert v <= uppers[b] and (b == 0 or v > uppers[b - 1])
        if v >= 8:
            assert uppers[b] - (uppers[b - 1] + 1) <= v / 8   # 1/8 relative width
    assert lib.qs_lat_bucket(2 ** 63) == n - 1
    assert lib.qs_lat_bucket(2 ** 64 - 1) == n - 1
    assert uppers[-1] == 2 ** 64 - 1


# ---------------------------------------------------------------- backends
#
# The connection layer (conn.c, conn_cmd.c) is one layer over every backend,
# so its suite runs over every backend: the `backend` fixture below makes
# cores for one of BACKENDS, and Linux's TCP is the peer in every case.
#
#   kernel      kernel sockets on 127.0.0.1;
#   uring       the same sockets under io_uring (skipped where it is refused);
#   ustack-tap  qstack's own TCP/IP on a TAP device in a namespace of the
#               test's own (netns.TapNetns, entered for the whole test, as
#               conftest's serve_any does): the core answers as
#               netns.STACK_IP, the clients are the namespace's kernel.
#
# Not here, and why: the in-memory wire (ustack/wire.c) joins two harness
# stacks under a fake clock (qsustack.h); the production core cannot open it
# (qs_ustack_settings.driver is TAP or DPDK), and it has no kernel peer.  DPDK's
# net_tap is a driver of ustack like TAP, but EAL initialises once per
# process, so it cannot make a core per test here; test_ustack_dpdk.py and
# serve_any run it in server processes.  A backend is one more class with
# make/listen and one more entry in BACKENDS (uring: kernel sockets, so
# KernelBackend's listen).
#
# KernelBackend and TapBackend are the one place a test core is made
# (NativeCore's constructor and its listen calls): when the binding gets a
# factory keyed by backend name and one listen call taking a listen spec,
# only their make() and listen() change.

USTACK_PORT = 8000


class KernelBackend:
    name = "kernel"

    def make(self, **options):
        """A NativeCore on this backend, not listening, not started."""
        return open_core("kernel", **options)

    def listen(self, core):
        """Make `core` listen; returns the address its clients connect to."""
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(1024)
        addr = ls.getsockname()
        fd = ls.detach()
        try:
            core.listen(fd=fd)             # the core owns it now
        except OSError:
            os.close(fd)
            raise
        return addr


class UringBackend(KernelBackend):
    """Kernel sockets under io_uring: the same listening sockets as kernel."""
    name = "uring"

    def make(self, **options):
        return open_core("uring", **options)


class TapBackend:
    name = "ustack-tap"

    def __init__(self, net):
        self.net = net

    def make(self, **options):
        settings = dict(driver="tap", tap=self.net.dev, multiqueue=False, eal=None,
                        dpdk_lib=None, mac=None, ip=STACK_IP, prefix=24, gateway=None,
                        max_conns=4096, buffers=16384, snd_buf=262144, rcv_buf=262144,
                        syn_backlog=1024, loss=0.0, dup=0.0, reorder=0.0, corrupt=0.0,
                        fault_seed=1)
        return open_core("ustack", settings=settings, **options)

    def listen(self, core):
        core.listen(port=USTACK_PORT)
        return (STACK_IP, USTACK_PORT)


KERNEL = KernelBackend()


def kernel_backend():
    yield KERNEL


def uring_backend():
    from qstack.transport import uring_refusal
    if uring_refusal():
        pytest.skip(uring_refusal())
    yield UringBackend()


def tap_backend():
    """The user-space stack on a TAP device in a namespace of the test's own,
    entered for the whole test (the core, its clients and their threads)."""
    why = why_not()
    if why:
        pytest.skip(why)
    net = TapNetns()
    try:
        # Frames the kernel sends in the first moments after the stack
        # attaches the device are dropped (the device's queue is activated
        # when the carrier comes on).  The first is the ARP request for the
        # stack, which the kernel repeats after a second by default (the
        # test's first connect would wait that long): here every 10 ms, for
        # a second as before.
        neigh = f"net.ipv4.neigh.{net.dev}"
        net.run("sysctl", "-qw", f"{neigh}.retrans_time_ms=10", f"{neigh}.mcast_solicit=100")
        with net.entered():
            yield TapBackend(net)
    finally:
        net.close()


# name -> a generator that yields the backend for one test (and cleans up)
BACKENDS = {"kernel": kernel_backend, "uring": uring_backend, "ustack-tap": tap_backend}


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    yield from BACKENDS[request.param]()


# ---------------------------------------------------------------- a hub in Python

# Inline cores alive in this test: waiting helpers (wait_for, recv_exact,
# settle) drive them instead of sleeping, as the hub's event loop would.
_INLINE = []


def pump_once(timeout=0.001):
    """Step every inline core once, blocking at most timeout in it (or
    sleep that long if there is none): one turn of the hub's loop.  A core a
    hub thread is stepping already is left to it."""
    stepped = False
    for core in list(_INLINE):
        if core.lock.acquire(blocking=False):
            try:
                if core in _INLINE:
                    core.step_locked(timeout)
                    stepped = True
            finally:
                core.lock.release()
    if not stepped:
        time.sleep(timeout)


def pump(seconds):
    """Let time pass; inline cores are stepped meanwhile."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        if not _INLINE:
            time.sleep(left)
            return
        pump_once(min(max(left, 0.001), 0.002))


settle = pump

TEST_DEFAULTS = dict(levels=2, ring_size=1024, cmd_ring_size=1024, buf_count=1024)


class Driven:
    """The production NativeCore, driven by Python playing the hub: events
    as tuples, commands from tuples, every buffer reference the test holds
    counted, and (inline) the stack stepped by whoever waits.  Only
    NativeCore's public calls are used."""

    def __init__(self, backend, listen=True, **options):
        self.backend = backend.name
        self.nc = backend.make(**{**TEST_DEFAULTS, **options})
        self.inline, self.levels = self.nc.inline, self.nc.levels
        self.lock = threading.Lock()      # inline: one stepping thread at a time
        self.addr = backend.listen(self.nc) if listen else None
        self.nc.start()
        if self.inline:
            _INLINE.append(self)
        self.evs = ffi.new("qs_event[1024]")
        self.held = collections.Counter()   # buffer references the hub owns
        self.joined = False
        self.last_stats = None
        self.net_bufs_back = True         # close() checks the stack's packet pool

    # -- events
    def poll(self, level=-1, max=1024):
        n = self.nc.poll(level, self.evs, max)
        assert n >= 0, n
        out = list(EV.iter_unpack(ffi.buffer(self.evs, n * 64)))
        for e in out:
            if e[3]:
                self.held[e[3]] += 1
        return out

    def step_locked(self, timeout):
        n = self.nc.step(max(0, int(timeout * 1000)))
        assert n >= 0, n
        return n

    def step(self, timeout=0.0):
        """Inline: run the stack once in this thread."""
        with self.lock:
            return self.step_locked(timeout)

    def sleep(self):
        """Announce the hub sleeps: 0 armed, 1 if events already wait."""
        return self.nc.sleep_below(self.levels)

    def wait(self, timeout=0.2):
        """Sleep through the wake fd protocol until events may be there;
        inline: step the stack, blocking in it for at most timeout."""
        if self.inline:
            if self.sleep() == 0:
                self.step(timeout)
            return
        if self.sleep() == 0:
            select.select([self.nc.wake_fd], [], [], timeout)
        try:
            os.read(self.nc.wake_fd, 8)
        except BlockingIOError:
            pass

    def events(self, until, timeout=10.0, level=-1):
        """Poll until until(events_so_far) is true."""
        got, deadline = [], time.monotonic() + timeout
        while not until(got):
            assert time.monotonic() < deadline, f"timed out with {len(got)} events"
            evs = self.poll(level)
            if evs:
                got += evs
            else:
                self.wait(0.05)
        return got

    def payload(self, e):
        kind, level, conn, buf, off, ln = e[:6]
        if kind == DATA:
            return bytes(self.nc.slab[off:off + ln])
        assert kind == BIGDATA
        return ffi.buffer(ffi.cast("char *", off), ln)[:]

    # -- commands
    def submit(self, cmds, staging=b"", timeout=10.0):
        """cmds: tuples (op, level, conn, buf, off, len, t_rx, flags)."""
        arr = ffi.new("qs_cmd[]", len(cmds))
        for i, c in enumerate(cmds):
            a = arr[i]
            (a.op, a.level, a.conn, a.buf, a.off, a.len, a.t_rx, a.flags) = c
        stg = ffi.from_buffer(staging) if staging else ffi.NULL
        done, deadline = 0, time.monotonic() + timeout
        while done < len(cmds):
            n = self.nc.submit(arr + done, len(cmds) - done, stg)
            assert n >= 0, n
            done += n
            if self.inline and not self.joined:
                self.step(0)              # as the hub does: step after submitting
            if done < len(cmds):
                assert time.monotonic() < deadline
                if not self.inline:
                    time.sleep(0.001)
        for c in cmds:
            if c[3]:
                self.held[c[3]] -= 1

    def echo(self, e, flags=0, level=None):
        kind, lvl, conn, buf, off, ln, t_rx, _ = e
        self.submit([(lib.QS_CMD_SEND_BUF, lvl if level is None else level, conn, buf,
                      off, ln, t_rx, flags)])

    def reply_copy(self, e, data, flags=0):
        kind, lvl, conn, buf, off, ln, t_rx, _ = e
        self.submit([(lib.QS_CMD_SEND_COPY, lvl, conn, buf, 0, len(data), t_rx, flags)],
                    staging=data)

    def done(self, e, op=lib.QS_CMD_DONE):
        self.submit([(op, e[1], e[2], e[3], 0, 0, 0, 0)])

    def stats(self):
        if self.nc.ptr is None:
            return self.last_stats
        return self.nc.stats()

    def shutdown(self, grace_s):
        if self in _INLINE:
            _INLINE.remove(self)
        with self.lock:
            self.nc.shutdown(grace_s)
        self.joined = True

    def close(self, grace=1.0):
        self.shutdown(grace)
        # events left in the rings after shutdown: drop them locally
        for _ in range(1000):
            if not self.poll():
                break
        for b, n in self.held.items():
            for _ in range(n):
                self.nc.release_local(b)
        self.held.clear()
        st = self.nc.stats()
        leaked, open_ = st.bufs_in_use, st.conns_open
        self.last_stats = st              # NativeCore's own struct: readable after free
        self.nc.free()
        assert leaked == 0
        assert open_ == 0
        if self.backend != "kernel" and self.net_bufs_back:
            assert st.net_bufs_in_use == 0, "packet buffers leaked"


class EchoHub(threading.Thread):
    """A hub thread echoing every message (zero copy, or as a copy)."""

    def __init__(self, core, copy=False, transform=None):
        super().__init__(daemon=True)
        self.core, self.copy, self.transform = core, copy, transform
        self.stop, self.count, self.error = False, 0, None

    def run(self):
        core = self.core
        try:
            while not self.stop:
                evs = core.poll()
                if not evs:
                    core.wait(0.02)
                    continue
                cmds, staging = [], bytearray()
                for e in evs:
                    kind, lvl, conn, buf, off, ln, t_rx, _ = e
                    if kind not in (DATA, BIGDATA):
                        continue
                    if self.copy:
                        data = core.payload(e)
                        if self.transform:
                            data = self.transform(data)
                        cmds.append((lib.QS_CMD_SEND_COPY, lvl, conn, buf, len(staging),
                                     len(data), t_rx, 0))
                        staging += data
                    else:
                        cmds.append((lib.QS_CMD_SEND_BUF, lvl, conn, buf, off, ln, t_rx, 0))
                    self.count += 1
                if cmds:
                    core.submit(cmds, bytes(staging))
        except BaseException as exc:     # surfaced by join()
            self.error = exc

    def join(self, timeout=10):
        self.stop = True
        super().join(timeout)
        assert not self.is_alive()
        if self.error:
            raise self.error


LAYOUTS = ["threaded", "inline"]


@pytest.fixture(params=LAYOUTS)
def layout(request):
    return request.param


def _made(backend, layout):
    made = []

    def make(**kw):
        kw.setdefault("inline", layout == "inline")
        c = Driven(backend, **kw)
        made.append(c)
        return c
    yield make
    try:
        for c in made:
            if c.nc.ptr is not None:
                c.close()
    finally:
        _INLINE.clear()


@pytest.fixture
def cores(backend, layout):
    """cores(**options) makes a started, listening core on every backend and
    layout; at teardown each must have no buffer in use and no conn open."""
    yield from _made(backend, layout)


@pytest.fixture
def kernel_cores(layout):
    """cores() for what only kernel sockets have (file descriptors)."""
    yield from _made(KERNEL, layout)


def connect(core, n=1, timeout=10.0, rcvbuf=None):
    """n clients, returned once the core has accepted them all.  The
    handshakes are non-blocking: an inline user-space stack only answers
    while it is stepped."""
    before = core.stats().conns_accepted
    socks = [socket.socket() for _ in range(n)]
    poller, pending = select.poll(), {}
    for s in socks:
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.setblocking(False)
        assert s.connect_ex(core.addr) in (0, errno.EINPROGRESS)
        poller.register(s, select.POLLOUT)
        pending[s.fileno()] = s
    deadline = time.monotonic() + timeout
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} of {n} connects pending"
        for fd, _ in poller.poll(0 if _INLINE else 50):
            s = pending.pop(fd)
            poller.unregister(fd)
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        if pending and _INLINE:
            pump_once()
    for s in socks:
        s.settimeout(timeout)
    wait_for(lambda: core.stats().conns_accepted >= before + n, what="accepted")
    return socks


def refused(addr, timeout=10.0):
    """A connect to addr is refused (inline cores are stepped meanwhile)."""
    with socket.socket() as s:
        s.setblocking(False)
        assert s.connect_ex(addr) in (0, errno.EINPROGRESS)
        deadline = time.monotonic() + timeout
        while not select.select([], [s], [], 0 if _INLINE else 0.05)[1]:
            assert time.monotonic() < deadline, "connect neither refused nor accepted"
            pump_once()
        return s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED


def recv_exact(s, n, timeout=10.0):
    out = bytearray()
    if _INLINE:                    # inline: drive the stack while waiting
        deadline = time.monotonic() + timeout
        s.settimeout(0)
        while len(out) < n:
            try:
                chunk = s.recv(min(n - len(out), 1 << 20))
            except BlockingIOError:
                assert time.monotonic() < deadline, f"timed out after {len(out)} of {n} bytes"
                pump_once()
                continue
            assert chunk, f"EOF after {len(out)} of {n} bytes"
            out += chunk
        s.settimeout(timeout)
        return bytes(out)
    s.settimeout(timeout)
    while len(out) < n:
        chunk = s.recv(min(n - len(out), 1 << 20))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def recv_some(s, n, timeout=10.0):
    """One recv() (b"" at EOF; raises on reset), driving inline cores."""
    if not _INLINE:
        s.settimeout(timeout)
        return s.recv(n)
    deadline = time.monotonic() + timeout
    s.settimeout(0)
    try:
        while True:
            try:
                return s.recv(n)
            except BlockingIOError:
                assert time.monotonic() < deadline, "timed out in recv"
                pump_once()
    finally:
        s.settimeout(timeout)


def wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if _INLINE:
            pump_once()
        else:
            time.sleep(0.005)


# ---------------------------------------------------------------- sockets

def test_config_validation():
    """qs_core_new refuses a bad config with EINVAL; NativeCore says so as an
    OSError (an unknown framing or reply order never reaches C)."""
    bad = [dict(levels=0), dict(levels=9), dict(ring_size=1000), dict(cmd_ring_size=3),
           dict(buf_size=255), dict(framing="length", frame_arg=3),
           dict(framing="fixed", frame_arg=0), dict(default_level=2),
           dict(rules=[(0, 1, 0xff, 2)]), dict(rules=[(-1, 1, 0xff, 0)]),
           dict(buf_count=0), dict(max_message=0),
           dict(framing="fixed", frame_arg=100, max_message=10), dict(stack_cpu=100000)]
    for kw in bad:
        with pytest.raises(OSError) as exc:
            KERNEL.make(**{**TEST_DEFAULTS, **kw})
        assert exc.value.errno == errno.EINVAL, kw
    for kw in (dict(framing="nine"), dict(reply_order="random")):
        with pytest.raises(KeyError):
            KERNEL.make(**{**TEST_DEFAULTS, **kw})
    with pytest.raises(ValueError):
        KERNEL.make(**TEST_DEFAULTS, rules=[(0, 1, 0xff, 0)] * (lib.QS_MAX_RULES + 1))
    KERNEL.make(**TEST_DEFAULTS).free()          # never started


def test_echo_zero_copy_and_copy(cores):
    core = cores()
    a, b = connect(core, 2)
    a.sendall(b"hello")
    (e,) = core.events(lambda g: len(g) >= 1)
    assert e[0] == DATA and core.payload(e) == b"hello" and e[6] > 0
    core.echo(e)
    assert recv_exact(a, 5) == b"hello"
    b.sendall(b"question")
    (e,) = core.events(lambda g: len(g) >= 1)
    core.reply_copy(e, b"answer!")
    assert recv_exact(b, 7) == b"answer!"
    st = core.stats()
    assert st.conns_accepted == 2 and st.conns_open == 2
    assert st.rx_msgs[1] == 2 and st.rx_bytes[1] == 13
    assert st.tx_msgs[1] == 2 and st.tx_bytes[1] == 12
    assert sum(st.lat[1][i] for i in range(lib.QS_LAT_BUCKETS)) == 2
    assert st.bufs_total == 1024
    a.close()
    b.close()
    wait_for(lambda: core.stats().conns_open == 0, what="server closes")


def test_many_conns_length_echo(cores):
    """200 conns x 20 LENGTH-framed messages, half echoed zero copy (header
    included), half as copies (header added): every byte checked."""
    core = cores(framing="length", frame_arg=2, max_message=4096, buf_size=4096)
    rnd = random.Random(7)
    socks = connect(core, 200)
    sent = {}
    for i, s in enumerate(socks):
        msgs = [bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 300)))
                for _ in range(20)]
        sent[i] = b"".join(length_msg(m, 2) for m in msgs)
    hub = EchoHub(core)
    hub.start()
    for i, s in enumerate(socks):     # in pieces, to split messages across reads
        data = sent[i]
        for j in range(0, len(data), 1000):
            s.sendall(data[j:j + 1000])
    for i, s in enumerate(socks):
        assert recv_exact(s, len(sent[i])) == sent[i]
    hub.join()
    assert hub.count == 4000
    hub2 = EchoHub(core, copy=True)
    hub2.start()
    for i, s in enumerate(socks):
        s.sendall(sent[i])
    for i, s in enumerate(socks):
        assert recv_exact(s, len(sent[i])) == sent[i]
    hub2.join()
    st = core.stats()
    assert st.rx_msgs[1] == 8000 and st.tx_msgs[1] == 8000
    assert st.conns_open == 200 and st.protocol_errors == 0
    for s in socks:
        s.close()
    wait_for(lambda: core.stats().conns_open == 0, what="server closes")


def test_line_echo_pipelined(cores):
    core = cores(framing="line", max_message=100000, buf_size=512)
    hub = EchoHub(core, copy=True, transform=lambda d: d.upper())
    hub.start()
    (s,) = connect(core)
    lines = [(b"line %d " % i) + b"x" * (i * 37 % 3000) + b"\n" for i in range(300)]
    blob = b"".join(lines)
    s.sendall(blob)
    assert recv_exact(s, len(blob)) == blob.upper()
    hub.join()
    assert hub.count == 300
    s.close()


def test_line_too_long_closes(cores):
    core = cores(framing="line", max_message=1000, buf_size=256)
    (s,) = connect(core)
    s.sendall(b"y" * 5000)
    with pytest.raises(ConnectionResetError):
        while recv_some(s, 100):
            pass
    wait_for(lambda: core.stats().protocol_errors == 1)
    wait_for(lambda: core.stats().conns_open == 0)


def test_length_4mib_jumbo_zero_copy(cores):
    core = cores(framing="length", frame_arg=4, max_message=8 << 20, buf_size=16384)
    (s,) = connect(core)
    payload = os.urandom(4 << 20)
    msg = length_msg(payload, 4)
    t = threading.Thread(target=s.sendall, args=(msg + length_msg(b"tail", 4),))
    t.start()
    evs = core.events(lambda g: len(g) >= 2)
    t.join()
    big, small = evs
    assert big[0] == BIGDATA and big[5] == len(payload)
    assert core.payload(big) == payload
    assert small[0] == DATA and core.payload(small) == b"tail"
    assert core.stats().bufs_in_use == 2
    core.echo(big)
    core.echo(small)
    assert recv_exact(s, len(msg) + 8) == msg + length_msg(b"tail", 4)
    s.close()


def test_send_buf_slice_rewrites_length_header(cores):
    core = cores(framing="length", frame_arg=2, max_message=1000)
    (s,) = connect(core)
    s.sendall(length_msg(b"0123456789", 2))
    (e,) = core.events(lambda g: len(g) >= 1)
    kind, lvl, conn, buf, off, ln, t_rx, _ = e
    core.submit([(lib.QS_CMD_SEND_BUF, lvl, conn, buf, off, 4, t_rx, 0)])  # shrunk reply
    assert recv_exact(s, 6) == length_msg(b"0123", 2)
    s.close()


def test_priority_rules(cores):
    """Byte 0 == 'H' -> level 0; the hub sees level 0 first, each level FIFO."""
    core = cores(framing="line", max_message=1000, rules=[(0, ord("H"), 0xff, 0)])
    (s,) = connect(core)
    msgs = [(b"H%d\n" if i % 3 == 0 else b"L%d\n") % i for i in range(60)]
    s.sendall(b"".join(msgs))
    wait_for(lambda: core.stats().rx_msgs[0] + core.stats().rx_msgs[1] == 60)
    evs = core.events(lambda g: len(g) >= 60)
    got = [core.payload(e) for e in evs]
    high = [m for m in msgs if m.startswith(b"H")]
    low = [m for m in msgs if m.startswith(b"L")]
    assert got == high + low
    assert [e[1] for e in evs] == [0] * len(high) + [1] * len(low)
    assert core.nc.pending_above(1) == 0
    for e in evs:
        core.echo(e)
    # level 0 commands run first: the high replies lead the stream
    data = recv_exact(s, len(b"".join(msgs)))
    assert data == b"".join(high + low)
    st = core.stats()
    assert st.rx_msgs[0] == len(high) and st.tx_msgs[0] == len(high)
    s.close()


def test_pending_above_and_poll_one_level(cores):
    core = cores(framing="line", max_message=100, rules=[(0, ord("H"), 0xff, 0)])
    (s,) = connect(core)
    s.sendall(b"L1\nH1\nL2\n")
    wait_for(lambda: core.nc.pending_above(2) == 3)
    assert core.nc.pending_above(1) == 1
    assert core.nc.pending_above(0) == 0
    low = core.poll(level=1)
    assert [core.payload(e) for e in low] == [b"L1\n", b"L2\n"]
    assert core.sleep() == 1                         # H1 still waiting
    high = core.poll(level=0)
    assert [core.payload(e) for e in high] == [b"H1\n"]
    assert core.nc.poll(2, core.evs, 10) == -errno.EINVAL
    for e in low + high:
        core.done(e)
    s.close()


def test_ring_full_backpressure(cores):
    """A tiny event ring: the conn stops being read, nothing is lost."""
    core = cores(framing="line", max_message=100, ring_size=4, levels=1, buf_size=256)
    (s,) = connect(core)
    msgs = [b"message number %05d\n" % i for i in range(3000)]
    t = threading.Thread(target=s.sendall, args=(b"".join(msgs),))
    t.start()
    wait_for(lambda: core.stats().paused_conns == 1, what="conn paused")
    assert core.stats().ring_depth[0] == 4
    got, deadline = [], time.monotonic() + 20
    while len(got) < len(msgs):
        assert time.monotonic() < deadline
        evs = core.poll(max=3)
        if not evs:
            core.wait(0.05)
        for e in evs:
            got.append(core.payload(e))
            core.done(e)
    t.join()
    assert got == msgs
    wait_for(lambda: core.stats().paused_conns == 0)
    s.close()


def test_pool_empty_backpressure(cores):
    """The hub holds every buffer: reading stops until it gives some back."""
    core = cores(framing="fixed", frame_arg=300, max_message=300, buf_size=256 * 4,
                 buf_count=4)
    (s,) = connect(core)
    msgs = [bytes([i % 251]) * 300 for i in range(200)]
    t = threading.Thread(target=s.sendall, args=(b"".join(msgs),))
    t.start()
    held, got, pauses, deadline = [], [], 0, time.monotonic() + 20
    while len(got) < len(msgs):
        assert time.monotonic() < deadline
        evs = core.poll()
        for e in evs:
            got.append(core.payload(e))
            held.append(e)
        if not evs:
            st = core.stats()
            if st.paused_conns == 1 and held:
                assert st.bufs_in_use <= 4
                pauses += 1
                for e in held:        # give everything back
                    core.done(e)
                held = []
            core.wait(0.02)
    t.join()
    for e in held:
        core.done(e)
    assert got == msgs
    assert pauses > 0
    s.close()


def test_client_reset_mid_stream(cores):
    core = cores(framing="line", max_message=100)
    (s,) = connect(core)
    s.sendall(b"one\ntwo\nthr")
    evs = core.events(lambda g: len(g) >= 2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()                                  # RST
    wait_for(lambda: core.stats().conns_open == 0, what="reset conn closed")
    for e in evs:                              # replies to a gone conn: stale
        core.echo(e)
    (s2,) = connect(core)                      # the core is fine
    s2.sendall(b"four\n")
    (e,) = core.events(lambda g: len(g) >= 1)
    assert e[2] != evs[0][2]                   # never the same conn id
    core.echo(e)
    assert recv_exact(s2, 5) == b"four\n"
    s2.close()
    wait_for(lambda: core.stats().bufs_in_use == 0, what="buffers back")


def nothing_arrives(s, wait=0.15):
    """No byte reaches s within wait seconds (inline cores are stepped)."""
    pump(wait)
    s.settimeout(0)
    try:
        assert s.recv(100) == b"!", "bytes arrived early"
    except BlockingIOError:
        pass
    finally:
        s.settimeout(10)


SEQ = lib.QS_SEQ_SHIFT


def test_reply_order_arrival(cores):
    """aux numbers a conn's messages; replies ahead of the awaited one park
    (copy, zero copy, DONE, an in-slot send) and leave in arrival order."""
    core = cores(framing="line", max_message=100)
    (s,) = connect(core)
    s.sendall(b"a\nb\nc\nd\ne\n")
    evs = core.events(lambda g: len(g) >= 5)
    assert [e[7] for e in evs] == [i << SEQ for i in range(1, 6)]
    a, b, c, d, e = evs
    core.reply_copy(e, b"E", flags=e[7])
    core.submit([(lib.QS_CMD_DONE, c[1], c[2], c[3], 0, 0, 0, c[7])])  # no reply
    core.echo(d, flags=d[7])                   # zero copy, parked with its buffer
    core.submit([(lib.QS_CMD_SEND_COPY, b[1], b[2], 0, 0, 4, 0, b[7])], staging=b"pre2")
    core.reply_copy(b, b"B", flags=b[7])
    nothing_arrives(s)
    core.echo(a, flags=a[7])
    assert recv_exact(s, 10) == b"a\npre2Bd\nE"
    s.sendall(b"f\n")                          # the conn carries on in order
    (f,) = core.events(lambda g: len(g) >= 1)
    assert f[7] == 6 << SEQ
    core.echo(f, flags=f[7])
    assert recv_exact(s, 2) == b"f\n"
    s.close()
    wait_for(lambda: core.stats().bufs_in_use == 0, what="buffers back")


def test_reply_order_close_in_slot_and_reset(cores):
    core = cores(framing="line", max_message=100)
    x, y = connect(core, 2)
    # an error close (DONE|F_CLOSE) parked behind an earlier reply
    x.sendall(b"1\n2\n3\n")
    e1, e2, e3 = core.events(lambda g: len(g) >= 3)
    core.echo(e3, flags=e3[7])
    core.submit([(lib.QS_CMD_DONE, e2[1], e2[2], e2[3], 0, 0, 0, e2[7] | lib.QS_F_CLOSE)])
    nothing_arrives(x)
    core.echo(e1, flags=e1[7])
    assert recv_exact(x, 2) == b"1\n"
    assert recv_some(x, 10) == b""             # closed right after, 3 never sent
    # parked replies (zero copy and copies) on a conn that is reset
    y.sendall(b"1\n2\n3\n4\n")
    f1, f2, f3, f4 = core.events(lambda g: len(g) >= 4)
    core.echo(f2, flags=f2[7])
    core.reply_copy(f3, b"three", flags=f3[7])
    core.submit([(lib.QS_CMD_SEND_COPY, f4[1], f4[2], 0, 0, 3, 0, f4[7])], staging=b"pre")
    y.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    y.close()                                  # RST
    wait_for(lambda: core.stats().conns_open == 0, what="reset conn closed")
    core.echo(f1, flags=f1[7])                 # stale
    core.done(f4)
    wait_for(lambda: core.stats().bufs_in_use == 0, what="parked buffers freed")


def test_reply_order_parked_bytes_count_toward_high_water(cores):
    """A peer pipelining behind one slow request holds parked replies: they
    count as unsent bytes, so the conn stops being read."""
    core = cores(framing="line", max_message=100, out_high_water=1024)
    (s,) = connect(core)
    s.sendall(b"1\n2\n")
    e1, e2 = core.events(lambda g: len(g) >= 2)
    big = b"x" * 3000
    core.reply_copy(e2, big, flags=e2[7])
    wait_for(lambda: core.stats().paused_conns == 1, what="paused by parked bytes")
    core.echo(e1, flags=e1[7])
    assert recv_exact(s, 3002) == b"1\n" + big
    wait_for(lambda: core.stats().paused_conns == 0, what="reading again")
    s.sendall(b"3\n")
    (e3,) = core.events(lambda g: len(g) >= 1)
    core.echo(e3, flags=e3[7])
    assert recv_exact(s, 2) == b"3\n"
    s.close()


def test_reply_order_completion_and_stream_unnumbered(cores):
    core = cores(framing="line", max_message=100, reply_order="completion")
    (s,) = connect(core)
    s.sendall(b"a\nb\n")
    a, b = core.events(lambda g: len(g) >= 2)
    assert a[7] == b[7] == 0
    core.echo(b, flags=(9 << SEQ))             # a seq is ignored here
    assert recv_exact(s, 2) == b"b\n"
    core.echo(a)
    assert recv_exact(s, 2) == b"a\n"
    s.close()
    core.close()                               # a TAP device serves one core at a time
    st = cores(framing="line", max_message=100, stream_mode=True)
    (s,) = connect(st)
    s.sendall(b"a\n")
    evs = st.events(lambda g: any(e[0] == DATA for e in g))
    assert all(e[7] == 0 for e in evs)
    for e in evs:
        if e[3]:
            st.done(e, op=lib.QS_CMD_RELEASE)
    s.close()


def test_half_close_message_mode(cores):
    core = cores(framing="line", max_message=100)
    (s,) = connect(core)
    s.sendall(b"a\nb\nc\npartial")
    s.shutdown(socket.SHUT_WR)
    evs = core.events(lambda g: len(g) >= 3)
    settle(0.05)
    assert core.stats().conns_open == 1        # requests in flight: not closed yet
    for e in evs:
        core.reply_copy(e, b"re:" + core.payload(e))
    assert recv_exact(s, 15) == b"re:a\nre:b\nre:c\n"
    assert recv_some(s, 10) == b""            # then the server closes
    wait_for(lambda: core.stats().conns_open == 0)
    s.close()


def test_stream_mode_order(cores):
    core = cores(stream_mode=True, levels=2, rules=[(0, ord("H"), 0xff, 0)])
    (s,) = connect(core)
    evs = core.events(lambda g: len(g) >= 1)
    assert evs[0][0] == lib.QS_EV_ACCEPTED and evs[0][1] == 1
    conn = evs[0][2]
    s.sendall(b"Hhigh")
    evs += core.events(lambda g: len(g) >= 1)
    s.shutdown(socket.SHUT_WR)
    evs += core.events(lambda g: len(g) >= 1)
    kinds = [e[0] for e in evs]
    assert kinds == [lib.QS_EV_ACCEPTED, DATA, lib.QS_EV_EOF]
    assert all(e[2] == conn for e in evs)
    assert evs[1][1] == 0 and evs[2][1] == 1
    core.done(evs[1], op=lib.QS_CMD_RELEASE)
    # never auto-closed: the hub can still write, then close
    core.submit([(lib.QS_CMD_SEND_COPY, 0, conn, 0, 0, 3, 0, lib.QS_F_CLOSE)], b"bye")
    closed = core.events(lambda g: len(g) >= 1)
    assert closed[0][0] == lib.QS_EV_CLOSED and closed[0][2] == conn
    assert recv_exact(s, 3) == b"bye"
    assert recv_some(s, 10) == b""
    s.close()


def test_stream_mode_data_before_eof_under_load(cores):
    """Many conns each send then close: per conn, every DATA comes before its
    EOF, and CLOSED after the hub closes it."""
    core = cores(stream_mode=True, levels=2, rules=[(0, 0x80, 0x80, 0)], ring_size=8)
    socks = connect(core, 50)
    for i, s in enumerate(socks):
        s.sendall(bytes([0x80 | i]) * 10)
        s.shutdown(socket.SHUT_WR)
    seen, closed, deadline = {}, set(), time.monotonic() + 20
    while len(closed) < 50:
        assert time.monotonic() < deadline
        evs = core.poll(max=5)
        if not evs:
            core.wait(0.02)
        for e in evs:
            kind, conn = e[0], e[2]
            st = seen.setdefault(conn, [])
            if kind == DATA:
                assert lib.QS_EV_EOF not in st
                core.done(e, op=lib.QS_CMD_RELEASE)
            elif kind == lib.QS_EV_EOF:
                core.submit([(lib.QS_CMD_CLOSE, 1, conn, 0, 0, 0, 0, 0)])
            elif kind == lib.QS_EV_CLOSED:
                assert lib.QS_EV_EOF in st
                closed.add(conn)
            st.append(kind)
    for s in socks:
        s.close()


def test_abort_close_and_notify(cores):
    core = cores(stream_mode=True)
    a, b = connect(core, 2)
    acc = core.events(lambda g: len(g) >= 2)
    ca, cb = acc[0][2], acc[1][2]
    core.submit([(lib.QS_CMD_SEND_COPY, 1, ca, 0, 0, 2, 0, lib.QS_F_NOTIFY)], b"hi")
    evs = core.events(lambda g: len(g) >= 1)
    assert evs[0][0] == lib.QS_EV_WRITABLE and evs[0][2] == ca
    assert recv_exact(a, 2) == b"hi"
    core.submit([(lib.QS_CMD_CLOSE, 1, cb, 0, 0, 0, 0, lib.QS_F_ABORT)])
    evs = core.events(lambda g: len(g) >= 1)
    assert evs[0][0] == lib.QS_EV_CLOSED and evs[0][2] == cb
    with pytest.raises(ConnectionResetError):
        recv_some(b, 10)
    a.close()
    b.close()


def test_high_water_and_pause(cores):
    """A reader that does not read: the server stops reading that conn once
    its unsent bytes pass out_high_water; PAUSE/RESUME work by hand."""
    core = cores(framing="line", max_message=100, out_high_water=1 << 16)
    (s,) = connect(core, rcvbuf=4096)          # a small window
    big = b"z" * (16 << 20)
    s.sendall(b"go\n")
    (e,) = core.events(lambda g: len(g) >= 1)
    core.reply_copy(e, big)
    wait_for(lambda: core.stats().paused_conns == 1, what="high water pause")
    assert recv_exact(s, len(big)) == big
    wait_for(lambda: core.stats().paused_conns == 0, what="resume below half")
    conn = e[2]
    core.submit([(lib.QS_CMD_PAUSE, 1, conn, 0, 0, 0, 0, 0)])
    wait_for(lambda: core.stats().paused_conns == 1)
    s.sendall(b"later\n")
    settle(0.05)
    assert core.poll() == []
    core.submit([(lib.QS_CMD_RESUME, 1, conn, 0, 0, 0, 0, 0)])
    (e,) = core.events(lambda g: len(g) >= 1)
    assert core.payload(e) == b"later\n"
    core.done(e)
    s.close()


def test_stop_accept_and_stop_read(cores):
    core = cores(framing="line", max_message=100)
    (s,) = connect(core)
    core.submit([(lib.QS_CMD_STOP_ACCEPT, 0, 0, 0, 0, 0, 0, 0),
                 (lib.QS_CMD_STOP_READ, 0, 0, 0, 0, 0, 0, 0)])
    settle(0.05)
    assert refused(core.addr)
    s.sendall(b"ignored for now\n")
    settle(0.05)
    assert core.poll() == []
    s.close()


def test_shutdown_flushes_and_releases(cores):
    """Shutdown runs the queued commands, flushes the reply in full, closes
    every socket and gives back every buffer, including those of events held
    by blocked conns; stats stay readable and later commands only return
    buffers."""
    core = cores(framing="line", max_message=100, ring_size=2, levels=1)
    socks = connect(core, 3)
    for s in socks:
        s.sendall(b"a\nb\nc\nd\n")
    wait_for(lambda: core.stats().rx_msgs[0] == 2 and core.stats().paused_conns >= 1)
    evs = core.poll()
    assert len(evs) == 2
    core.reply_copy(evs[0], b"x" * 3000000)     # still being written at shutdown
    core.done(evs[1])
    got = {}

    def drain(s):
        s.settimeout(10)
        buf = bytearray()
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
        got[s] = len(buf)
    readers = [threading.Thread(target=drain, args=(s,)) for s in socks]
    for t in readers:
        t.start()
    core.shutdown(5.0)
    for t in readers:
        t.join(10)
    assert sorted(got.values()) == [0, 0, 3000000]
    assert core.stats().conns_open == 0
    leftover = core.poll()                      # still in the ring: returned locally
    core.submit([(lib.QS_CMD_DONE, 0, e[2], e[3], 0, 0, 0, 0) for e in leftover])
    assert core.stats().bufs_in_use == 0
    for s in socks:
        s.close()


def tcp_ext(*names):
    """Linux's TcpExt counters in this thread's network namespace."""
    with open("/proc/thread-self/net/netstat") as f:
        lines = f.read().splitlines()
    for keys, values in zip(lines[::2], lines[1::2]):
        if keys.startswith("TcpExt:"):
            table = dict(zip(keys.split()[1:], map(int, values.split()[1:])))
            return sum(table[n] for n in names)
    raise AssertionError("no TcpExt line in /proc/net/netstat")


def window_probes():
    """Probes of a closed window seen in this namespace: sent by Linux (the
    kernel backend's server side), or received past the window (a probe
    carrying a new byte, as the user-space stack sends them: BeyondWindow)."""
    return tcp_ext("TCPWinProbe", "BeyondWindow")


def test_shutdown_ends_conns_it_could_not_flush(cores):
    """A peer that stopped reading is still owed reply bytes when the grace
    time runs out: the shutdown ends its connection anyway, and the peer
    learns it (a reset, or EOF once it has read what reached it), never
    waits on a dead server.  The server has probed the peer's closed window
    first: a user-space stack's probe byte lies past that window, and its
    RST must not (RFC 9293 3.10.7.3 and RFC 5961 3.2: the peer drops a
    reset it finds outside its window)."""
    core = cores(framing="line", max_message=100)
    (s,) = connect(core, rcvbuf=4096)              # a small window, soon shut
    s.sendall(b"go\n")
    (e,) = core.events(lambda g: len(g) >= 1)
    probes = window_probes()
    core.reply_copy(e, b"z" * (1 << 20))
    wait_for(lambda: window_probes() > probes, what="a probe of the closed window")
    if core.backend != "kernel":
        core.net_bufs_back = False    # see test_shutdown_gives_back_the_packet_buffers
    core.shutdown(0.05)                            # far too short for 1 MiB
    st = core.stats()
    assert st.conns_open == 0 and st.bufs_in_use == 0
    got, end = 0, None
    s.settimeout(10)                               # a peer left hanging fails here
    for _ in range(1000):
        try:
            chunk = s.recv(1 << 16)
        except ConnectionResetError:
            end = "reset"
            break
        except TimeoutError:
            end = "hangs"
            break
        if not chunk:
            end = "eof"
            break
        got += len(chunk)
    assert end in ("reset", "eof") and got > 0, (end, got)
    s.close()


@pytest.mark.parametrize("backend", ["ustack-tap"], indirect=True)
def test_shutdown_gives_back_the_packet_buffers(cores):
    """After a shutdown that had to reset a conn, the user-space stack holds
    no packet buffer any more (the exit line's leak check says 0)."""
    core = cores(framing="line", max_message=100)
    (s,) = connect(core, rcvbuf=4096)
    s.sendall(b"go\n")
    (e,) = core.events(lambda g: len(g) >= 1)
    core.reply_copy(e, b"z" * (1 << 20))
    wait_for(lambda: core.stats().net_bufs_in_use > 100, what="a full send queue")
    core.net_bufs_back = False        # asserted here, not again at teardown
    core.shutdown(0.05)
    in_use = core.stats().net_bufs_in_use
    s.close()
    assert in_use == 0


def test_submit_validation(cores):
    core = cores()
    arr = ffi.new("qs_cmd[1]")
    arr[0].op, arr[0].level = lib.QS_CMD_DONE, 5
    assert core.nc.submit(arr, 1, ffi.NULL) == -errno.EINVAL
    arr[0].op, arr[0].level, arr[0].len = lib.QS_CMD_SEND_COPY, 0, 4
    assert core.nc.submit(arr, 1, ffi.NULL) == -errno.EINVAL
    assert lib.qs_core_release_local(core.nc.ptr, 12345) == -errno.EBUSY


def test_wakeups_are_never_lost(cores):
    """Strict request/response ping-pong: both sides sleep between messages,
    so every message needs a wake-up.  The hub sleeps as in production: it
    announces it (sleep_below) and waits on NativeCore.wake_fd (threaded: the
    eventfd the stack writes; inline: the stack's poll fd, then steps).  A
    lost wake-up is a wait that ends without the fd readable."""
    core = cores(framing="line", max_message=100)
    (s,) = connect(core)
    for i in range(1500):
        s.sendall(b"ping %d\n" % i)
        evs = []
        for _ in range(100):                     # a few spurious turns at most
            evs = core.poll()
            if evs:
                break
            if core.sleep() == 0:
                ready = select.select([core.nc.wake_fd], [], [], 10.0)[0]
                assert ready, f"message {i}: no wake-up"
            if core.inline:
                core.step(0)
            else:
                try:
                    os.read(core.nc.wake_fd, 8)
                except BlockingIOError:
                    pass
        (e,) = evs
        if i % 2:
            core.echo(e)
        else:
            core.reply_copy(e, core.payload(e))
        assert recv_exact(s, len(b"ping %d\n" % i)) == b"ping %d\n" % i
    st = core.stats()
    assert st.stack_cpu_ns > 0
    assert sum(st.lat[1][b] for b in range(lib.QS_LAT_BUCKETS)) == 1500
    s.close()


def test_accept_backoff_on_emfile(kernel_cores):
    """EMFILE on accept: counted, listeners rest 100 ms, then accept again.
    (Kernel sockets only: the user-space stack's conns take no fd.)"""
    import resource
    core = kernel_cores()
    clients = [socket.socket() for _ in range(4)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest = os.dup(0)                     # the lowest free fd number
    os.close(lowest)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))   # no fd left
        for c in clients:
            c.connect(core.addr)           # the kernel completes the handshake
        wait_for(lambda: core.stats().accept_errors >= 1, what="accept error")
        assert core.stats().conns_accepted == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if core.inline:     # an idle hub watching the poll fd learns when to accept again
        pfd = core.nc.wake_fd
        assert select.select([pfd], [], [], 2.0)[0] == [pfd]
    wait_for(lambda: core.stats().conns_accepted == 4, what="accepts resume")
    assert core.stats().accept_errors < 10                 # backed off, no spin
    clients[0].sendall(b"still works")
    (e,) = core.events(lambda g: len(g) >= 1)
    core.echo(e)
    assert recv_exact(clients[0], 11) == b"still works"
    for c in clients:
        c.close()


def test_lifecycle_errors(backend, layout):
    inline = layout == "inline"
    core = backend.make(**TEST_DEFAULTS, inline=inline)
    if inline:
        assert core.step(0) == -errno.EINVAL            # not started
    core.start()
    with pytest.raises(OSError) as exc:
        core.start()
    assert exc.value.errno == errno.EALREADY
    with pytest.raises(OSError) as exc:
        backend.listen(core)                            # too late once started
    assert exc.value.errno == errno.EBUSY
    if inline:
        assert core.step(0) == 0
    else:
        assert core.step(0) == -errno.EINVAL            # threaded: no stepping
    core.shutdown(0)
    core.shutdown(0)
    if inline:
        assert core.step(0) == -errno.ESHUTDOWN
    st = core.stats()
    assert st.bufs_in_use == 0 and st.conns_open == 0
    core.free()
    core.free()


def test_never_started_core_closes_its_listener():
    core = KERNEL.make(**TEST_DEFAULTS)
    addr = KERNEL.listen(core)
    core.shutdown(0)                  # never started: nothing to stop
    core.free()
    assert refused(addr)


# ---------------------------------------------------------------- inline layout

def stack_threads():
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:      # the thread just ended
            pass
    return names.count("qs-stack")


def test_inline_has_no_stack_thread(backend):
    before = stack_threads()
    threaded = Driven(backend)
    wait_for(lambda: stack_threads() == before + 1,   # the check does see one
             what="threaded core's stack thread named")
    threaded.close()
    wait_for(lambda: stack_threads() == before, what="stack thread gone")
    core = Driven(backend, inline=True)
    try:
        assert stack_threads() == before
        (s,) = connect(core)
        s.sendall(b"hello")
        (e,) = core.events(lambda g: len(g) >= 1)
        core.echo(e)
        assert recv_exact(s, 5) == b"hello"
        assert stack_threads() == before
        s.close()
    finally:
        _INLINE.clear()
        core.close()


def test_inline_poll_fd_step_and_no_wakeups(backend):
    """The poll fd is readable when a step has socket work; a step returns
    the events it published; the wake eventfds are never written; conns
    blocked on a full ring do not make the poll fd readable (no spin)."""
    core = Driven(backend, inline=True, framing="line", max_message=100, ring_size=2, levels=1)
    try:
        pfd = core.nc.wake_fd                # inline: the stack's epoll fd (uring: its ring)
        assert os.readlink(f"/proc/self/fd/{pfd}") == (
            "anon_inode:[io_uring]" if backend.name == "uring" else "anon_inode:[eventpoll]")
        (s,) = connect(core)
        s.sendall(b"a\n")
        assert select.select([pfd], [], [], 5)[0] == [pfd]
        published = 0
        for _ in range(100):                 # the user-space stack may need a few
            published += core.step(0)
            if published:
                break
        assert published == 1
        assert core.sleep() == 1             # the event waits in the ring
        (e,) = core.poll()
        assert core.sleep() == 0
        core.echo(e)                         # submit + step(0): the reply leaves now
        assert recv_exact(s, 2) == b"a\n"
        # ring of 2: four lines, the conn blocks with one event held
        s.sendall(b"b\nc\nd\ne\n")
        wait_for(lambda: core.stats().paused_conns == 1, what="conn blocked")
        assert core.stats().ring_depth[0] == 2
        # The blocked conn leaves the poll fd quiet (it still has bytes to
        # read: reported again and again, the hub would spin).  The user-space
        # stack's own timers (a delayed ACK) may fire once first.
        for _ in range(20):
            if not select.select([pfd], [], [], 0.05)[0]:
                break
            assert core.step(0) == 0
        else:
            raise AssertionError("the poll fd stays readable while the conn is blocked")
        got = core.poll()                    # room again: the next step resumes it
        assert core.step(0) == 2
        got += core.poll()
        assert [core.payload(e) for e in got] == [b"b\n", b"c\n", b"d\n", b"e\n"]
        for e in got:
            core.done(e)
        # never a wakeup through the eventfds
        wake = lib.qs_core_wake_fd(core.nc.ptr)
        assert select.select([wake], [], [], 0)[0] == []
        s.close()
    finally:
        _INLINE.clear()
        core.close()


def test_inline_stack_cpu_ns_increases(backend):
    """Inline, the stack's CPU is the time spent in steps: it grows with
    work, and a step that sleeps through an idle wait costs (almost) none."""
    core = Driven(backend, inline=True, framing="line", max_message=100)
    try:
        (s,) = connect(core)
        cpu0 = core.stats().stack_cpu_ns
        for i in range(200):
            s.sendall(b"x%d\n" % i)
            (e,) = core.events(lambda g: len(g) >= 1)
            core.echo(e)
            assert recv_exact(s, len(b"x%d\n" % i)) == b"x%d\n" % i
        cpu1 = core.stats().stack_cpu_ns
        assert cpu1 > cpu0
        core.step(0.2)                       # idle: blocks in epoll_wait
        assert core.stats().stack_cpu_ns - cpu1 < 50_000_000
        s.close()
    finally:
        _INLINE.clear()
        core.close()
    assert core.stats().stack_cpu_ns >= cpu1    # last read, taken by close()


def test_inline_shutdown_flushes_large_send(backend):
    """Shutdown in the hub's thread: a 32 MiB reply to a slow reader is
    flushed in full (blocking for the socket within the grace time), then
    every socket is closed and every buffer returned."""
    core = Driven(backend, inline=True, framing="line", max_message=100)
    big = os.urandom(32 << 20)
    (s,) = connect(core, rcvbuf=65536)
    s.sendall(b"go\n")
    (e,) = core.events(lambda g: len(g) >= 1)
    core.reply_copy(e, big)
    assert core.stats().conns_open == 1
    got = bytearray()

    def slow_reader():
        time.sleep(0.2)                      # shutdown starts with most bytes unsent
        s.settimeout(20)
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            got.extend(chunk)
    t = threading.Thread(target=slow_reader)
    t.start()
    core.shutdown(20.0)
    t.join(20)
    assert not t.is_alive()
    assert len(got) == len(big) and bytes(got) == big
    st = core.stats()
    assert st.conns_open == 0 and st.bufs_in_use == 0
    assert st.stack_cpu_ns > 0
    assert core.nc.step(0) == -errno.ESHUTDOWN
    core.close()
    s.close()
