"""The Python face of one native core (qstack/native/include/qstack.h).

Who keeps what alive while C holds a pointer:

- The qs_core and its slab belong to :class:`NativeCore`; ``slab`` is a
  memoryview over C memory that stays mapped until :meth:`free`, which is
  only called once no request view can be live any more.
- Commands and SEND_COPY payloads are only borrowed for the duration of
  ``qs_core_submit``: C copies what it needs before returning, so the hub may
  clear its staging buffers right after.
- Every data event carries one reference to a pool buffer; the hub hands it
  back with exactly one command naming it (or ``release_local`` once the stack
  thread is gone).
"""

import ipaddress
import socket
import struct
from functools import partial

from qstack._native import ffi, lib

__all__ = ["NativeCore", "KernelCore", "UringCore", "UstackCore", "BACKENDS", "backend_type",
           "open_core", "uring_refusal", "AUTO",
           "ffi", "lib", "EVENT_SIZE", "iter_events", "jumbo_view", "FRAMINGS"]

EVENT_SIZE = ffi.sizeof("qs_event")
assert EVENT_SIZE == ffi.sizeof("qs_cmd") == 64
iter_events = struct.Struct("8q").iter_unpack

FRAMINGS = {
    "raw": lib.QS_FRAME_RAW,
    "line": lib.QS_FRAME_LINE,
    "fixed": lib.QS_FRAME_FIXED,
    "length": lib.QS_FRAME_LENGTH,
    "http": lib.QS_FRAME_HTTP,
}

HTTP_RULES = {
    "path": lib.QS_HTTP_RULE_PATH,
    "header": lib.QS_HTTP_RULE_HEADER,
    "method": lib.QS_HTTP_RULE_METHOD,
}

REPLY_ORDERS = {
    "arrival": lib.QS_ORDER_ARRIVAL,
    "completion": lib.QS_ORDER_COMPLETION,
}


class NativeCore:
    """One qs_core: its stack thread, rings, pool and wake fd.

    The part every backend shares.  A backend is a subclass that names its
    table entry in C (``BACKEND``, a ``QS_BACKEND_*``), says what it is
    (the class attributes below) and fills its own settings into the
    qs_config (``_configure``); :func:`open_core` picks one by name.
    """

    name = None              # the backend's name, as server.backend says it
    BACKEND = None           # its entry in the C backend table (QS_BACKEND_*)
    # Listens on kernel sockets the frontend binds (SO_REUSEPORT): the core
    # processes of a port share them, a port can be probed before start, and
    # old and new cores can serve side by side during a reload.
    kernel_sockets = False
    # The stack does TCP itself (handshakes, ACKs, timers): inline, it needs
    # steps even while every worker is busy in a handler.
    needs_service = False
    NO_POLL = lib.QS_STEP_NO_POLL

    def __init__(self, *, levels, rules=(), default_level=None, framing="raw",
                 frame_arg=0, max_message=1 << 24, max_line=0, http_rules=(), ring_size=65536,
                 cmd_ring_size=65536, buf_size=16384, buf_count=8192,
                 out_high_water=4 << 20, stream_mode=False, conn_events=False, stack_cpu=-1,
                 inline=False, reply_order="arrival",
                 buf_reserve=None, partial_copy=1024, max_large_bytes=128 << 20,
                 max_out_bytes=64 << 20, message_timeout=30.0, idle_timeout=0.0,
                 write_timeout=30.0):
        if self.BACKEND is None:
            raise TypeError("NativeCore is abstract: open_core(backend, ...) picks a backend")
        cfg = ffi.new("qs_config *")
        cfg.levels = levels
        if len(rules) > lib.QS_MAX_RULES:
            raise ValueError(f"at most {lib.QS_MAX_RULES} native priority rules")
        cfg.nrules = len(rules)
        for i, (offset, value, mask, level) in enumerate(rules):
            r = cfg.rules[i]
            r.offset, r.value, r.mask, r.level = offset, value, mask, level
        if len(http_rules) > lib.QS_MAX_RULES:
            raise ValueError(f"at most {lib.QS_MAX_RULES} HTTP priority rules")
        cfg.nhttp_rules = len(http_rules)
        for i, (kind, level, name, value) in enumerate(http_rules):
            r = cfg.http_rules[i]
            r.kind, r.level = HTTP_RULES[kind], level
            r.name, r.name_len = name.encode(), len(name.encode())
            r.value, r.value_len = value.encode(), len(value.encode())
        cfg.default_level = levels - 1 if default_level is None else default_level
        # With no rule every message gets the default level: one ring is used.
        self.only_level = cfg.default_level if not rules and not http_rules else None
        cfg.framer.kind = FRAMINGS[framing]
        cfg.framer.arg = frame_arg
        cfg.framer.max_message = max_message
        cfg.framer.max_line = max_line
        cfg.ring_size = ring_size
        cfg.cmd_ring_size = cmd_ring_size
        cfg.buf_size = buf_size
        cfg.buf_count = buf_count
        cfg.out_high_water = out_high_water
        cfg.stream_mode = 1 if stream_mode else 0
        cfg.conn_events = 1 if conn_events else 0
        cfg.reply_order = REPLY_ORDERS[reply_order]
        cfg.stack_cpu = stack_cpu
        cfg.inline_stack = 1 if inline else 0
        # Hostile peers (conn.c): None picks an eighth of the pool; the small
        # partial copy never exceeds a quarter of a buffer.
        cfg.buf_reserve = min(1024, buf_count // 8) if buf_reserve is None else buf_reserve
        cfg.partial_copy = min(partial_copy, buf_size // 4)
        cfg.max_large_bytes = max_large_bytes
        cfg.max_out_bytes = max_out_bytes
        cfg.message_timeout_ns = int(message_timeout * 1e9)
        cfg.idle_timeout_ns = int(idle_timeout * 1e9)
        cfg.write_timeout_ns = int(write_timeout * 1e9)
        cfg.backend = self.BACKEND
        self._configure(cfg)
        err = ffi.new("int *")
        c = lib.qs_core_new(cfg, err)
        if c == ffi.NULL:
            raise OSError(-err[0], f"qs_core_new failed: {_strerror(-err[0])}")
        self.ptr = c
        self.levels = levels
        self.header_len = lib.qs_frame_header_len(ffi.addressof(cfg.framer))
        size = ffi.new("uint64_t *")
        base = lib.qs_core_slab(c, size)
        self.slab = memoryview(ffi.buffer(base, size[0]))
        self.slab_addr = int(ffi.cast("uintptr_t", base))
        self.inline = bool(inline)
        self.stream = bool(stream_mode)
        # What the hub's loop watches while idle: the stack's epoll fd when the
        # stack runs inline (qs_core_step), else the eventfd the thread writes.
        self.wake_fd = lib.qs_core_poll_fd(c) if inline else lib.qs_core_wake_fd(c)
        self._stats = ffi.new("qs_stats *")
        self._peer = ffi.new("qs_peer *")
        self.running = False
        # The hub's data path, bound to this core (partial is C: as cheap as
        # calling lib with the pointer).  A fake core for tests offers the
        # same five calls (tests/fakecore.py).
        self.poll = partial(lib.qs_core_poll, c)
        self.submit = partial(lib.qs_core_submit, c)
        self.pending_above = partial(lib.qs_core_pending_above, c)
        self.sleep_below = partial(lib.qs_core_sleep_below, c)
        self.step = partial(lib.qs_core_step, c)
        # The same submit for the hub's command queue, which calls it from C
        # (qstack/native/pyview/qslane.c): the core's and the function's addresses.
        self.submit_address = (int(ffi.cast("uintptr_t", c)),
                               int(ffi.cast("uintptr_t", ffi.addressof(lib, "qs_core_submit"))))
        # ... and its step and poll, for an inline hub's EventQueue.run
        self.stack_address = (self.submit_address[0],
                              int(ffi.cast("uintptr_t", ffi.addressof(lib, "qs_core_step"))),
                              int(ffi.cast("uintptr_t", ffi.addressof(lib, "qs_core_poll"))))

    def _configure(self, cfg):
        """Fill this backend's own part of the qs_config."""

    def listen(self, port=0, fd=-1):
        """Listen where a qs_listen_spec says (qstack.h: qs_core_listen):
        the kernel backend adopts ``fd``, a bound listening socket (the core
        owns it from now on); the user-space stack listens on ``port``."""
        spec = ffi.new("qs_listen_spec *")
        spec.fd, spec.port = fd, port
        _check(lib.qs_core_listen(self.ptr, spec), "qs_core_listen")

    def where(self, addresses, port):
        """What this core serves, as a log line names it: the listen
        addresses (HOST:PORT or unix:PATH each), comma-separated."""
        return ", ".join(addresses)

    def start(self):
        _check(lib.qs_core_start(self.ptr), "qs_core_start")
        self.running = True

    def shutdown(self, grace_s):
        if self.running:
            self.running = False
            _check(lib.qs_core_shutdown(self.ptr, int(max(grace_s, 0) * 1e9)),
                   "qs_core_shutdown")

    def release_local(self, buf):
        lib.qs_core_release_local(self.ptr, buf)

    def stats(self):
        lib.qs_core_stats(self.ptr, self._stats)
        return self._stats

    def peer(self, conn):
        """``(host, port)`` of connection ``conn`` as accepted, or None if
        it is not known (any more) or has no address (a Unix socket's peer).  A negative ``conn``, -lib.QS_CLOSED_*:
        the peer of the last connection the stack closed for that reason."""
        if self.ptr is None:
            return None
        out = self._peer
        if lib.qs_core_peer(self.ptr, conn, out) < 0:
            return None
        return peer_address(out)

    def free(self):
        if self.ptr is not None:
            self.slab.release()
            lib.qs_core_free(self.ptr)
            self.ptr = None


class KernelCore(NativeCore):
    """Kernel sockets under epoll (common/transport_kernel.c)."""

    name = "kernel"
    BACKEND = lib.QS_BACKEND_KERNEL
    kernel_sockets = True


class UringCore(NativeCore):
    """Kernel sockets driven by io_uring (common/transport_uring.c): multishot accept
    and receive into pool buffers, one io_uring_enter per loop step."""

    name = "uring"
    BACKEND = lib.QS_BACKEND_URING
    kernel_sockets = True

    def __init__(self, **options):
        why = uring_refusal()
        if why:
            raise OSError(_URING_ERRNO, why)
        super().__init__(**options)


class UstackCore(NativeCore):
    """qstack's own TCP/IP over a TAP or DPDK driver (common/transport_ustack.c).

    ``settings`` is the stack's settings as a plain dict (the fields of
    qs_ustack_settings; see qstack.server)."""

    name = "ustack"
    BACKEND = lib.QS_BACKEND_USTACK
    needs_service = True

    def __init__(self, *, settings, **options):
        self.settings = settings
        super().__init__(**options)

    def _configure(self, cfg):
        _ustack_settings(cfg.ustack, self.settings)

    def where(self, addresses, port):
        name = self.settings.get("name", self.settings["driver"])
        return f"{self.settings['ip']}:{port} on ustack/{name}"


# The backends by name: a new backend is a C table entry and a class here.
BACKENDS = {kind.name: kind for kind in (KernelCore, UringCore, UstackCore)}

# server.backend "auto" (the default): uring where the kernel allows it,
# else kernel -- decided once per process (forked cores inherit the answer).
AUTO = "auto"
_URING_ERRNO = 0
_uring_why = None


def uring_refusal():
    """Why the uring backend cannot run here (one line), or None.  Probed
    once: a small ring and a provided-buffer ring, made and torn down."""
    global _uring_why, _URING_ERRNO
    if _uring_why is None:
        import errno
        rc = lib.qs_uring_probe()
        _URING_ERRNO = -rc
        if rc == 0:
            _uring_why = ""
        elif -rc == errno.ENOPKG:
            _uring_why = "this build has no uring backend (liburing-dev was absent)"
        else:
            _uring_why = (f"the kernel refuses io_uring: {errno.errorcode.get(-rc, -rc)} "
                          f"({_strerror(-rc)})")
    return _uring_why or None


def backend_type(name):
    """The NativeCore class of a backend (what it is, before one is made);
    "auto" is uring where io_uring works, else kernel (logged once)."""
    if name == AUTO:
        return _auto_type()
    try:
        return BACKENDS[name]
    except KeyError:
        known = ", ".join((AUTO, *BACKENDS))
        raise ValueError(f"unknown backend {name!r} (known: {known})") from None


_auto_logged = False


def _auto_type():
    global _auto_logged
    why = uring_refusal()
    if why and not _auto_logged:
        import logging
        logging.getLogger("qstack").warning("backend auto: kernel, not uring: %s", why)
        _auto_logged = True
    return KernelCore if why else UringCore


def open_core(backend, **options):
    """A NativeCore of the named backend; options as NativeCore takes them,
    plus the backend's own (ustack: ``settings``)."""
    return backend_type(backend)(**options)


def _ustack_settings(n, net):
    """Fill a qs_ustack_settings from a plain dict (see qstack.server)."""
    n.driver = {"tap": lib.QS_DRIVER_TAP, "dpdk": lib.QS_DRIVER_DPDK}[net["driver"]]
    n.multiqueue = 1 if net["multiqueue"] else 0
    for name in ("tap", "eal", "dpdk_lib"):
        value = (net[name] or "").encode()
        if len(value) >= ffi.sizeof(getattr(n, name)):
            raise ValueError(f"ustack {name} is too long")
        setattr(n, name, value)
    if net["mac"]:
        n.mac = [int(x, 16) for x in net["mac"].split(":")]
    n.ip = int(ipaddress.IPv4Address(net["ip"]))
    n.prefix_len = net["prefix"]
    n.gateway = int(ipaddress.IPv4Address(net["gateway"])) if net["gateway"] else 0
    for name in ("max_conns", "buffers", "snd_buf", "rcv_buf", "syn_backlog",
                 "loss", "dup", "reorder", "corrupt", "fault_seed"):
        setattr(n, name, net[name])


def peer_address(p):
    """A qs_peer as ``(host, port)``, the way a socket's getpeername says it;
    None for any other family (AF_UNIX: a client's socket is unnamed)."""
    if p.family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, bytes(p.addr[0:4])), p.port
    if p.family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, bytes(p.addr[0:16])), p.port
    return None


def jumbo_view(address, length):
    """A writable memoryview over a jumbo buffer (QS_EV_BIGDATA)."""
    return memoryview(ffi.buffer(ffi.cast("char *", address), length))


def _strerror(code):
    import os
    return os.strerror(code)


def _check(rc, what):
    if rc < 0:
        raise OSError(-rc, f"{what}: {_strerror(-rc)}")
    return rc
