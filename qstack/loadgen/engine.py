"""The Python face of one native engine (qstack/native/include/qsload.h).

Who keeps what alive: the qsl_engine belongs to :class:`Engine` and is freed
by :meth:`Engine.close` (which also closes its sockets).  ``sources`` is
copied by qsl_engine_new, and the export buffers are only written during
the call, so no Python object is referenced by C between calls.  cffi
releases the GIL around every call; :meth:`Engine.run` blocks in C until its
deadline, so a Python thread (or a signal) gets its turn at least that often.
"""

from __future__ import annotations

import errno
import ipaddress
import os

from qstack import memif
from qstack._loadgen import ffi, lib
from qstack.loadgen.hist import Histogram

__all__ = ["Engine", "EngineTimes", "now_ns", "lib", "ffi", "STAT_FIELDS"]

NS = 1_000_000_000
MODES = {"epoch": lib.QSL_MODE_EPOCH, "rate": lib.QSL_MODE_RATE, "closed": lib.QSL_MODE_CLOSED}
PROTOCOLS = {"echo": lib.QSL_PROTO_ECHO, "iotep": lib.QSL_PROTO_IOTEP,
             "script": lib.QSL_PROTO_SCRIPT}
GRAINS = {"message": lib.QSL_GRAIN_MESSAGE, "connection": lib.QSL_GRAIN_CONN}
STAT_FIELDS = [name for name, _ in ffi.typeof("qsl_stats").fields]
LEVEL_NAMES = ("high", "low")   # level 0, level 1


def now_ns() -> int:
    return lib.qsl_now_ns()


class EngineTimes:
    """The run's timeline in CLOCK_MONOTONIC ns, shared by every process."""

    def __init__(self, o, t_start: int):
        self.start = t_start
        self.send = t_start + int((o.setup + o.wait) * NS)
        self.meas = self.send + int(o.warmup * NS)
        self.end = self.meas + int(o.duration * NS)
        self.drain_ns = int(o.drain * NS)


# The ustack client's stack: sized from the plan (control blocks for every
# connection and its TIME-WAIT, a packet pool that small messages never
# fill), the server's per-connection buffer limits.
USTACK_BUFFERS = (4096, 65536)      # packet buffers at least, at most (2 KiB each)
USTACK_SNDRCV = 262144              # bytes queued per connection, each way


def uring_refusal() -> str | None:
    """Why --backend uring cannot run here (one line), or None."""
    rc = lib.qs_uring_probe()
    return _uring_error(-rc) if rc < 0 else None


def _uring_error(err: int) -> str:
    """Why the uring transport would not open, in words."""
    if err == errno.ENOPKG:
        return "--backend uring: this build has no uring transport (liburing-dev was absent)"
    return (f"--backend uring: the kernel refuses io_uring: {errno.errorcode.get(err, err)} "
            f"({os.strerror(err)})")


def _ustack(cfg, o, link):
    """Fill cfg for the ustack backend (on memif, link `link` of --smp);
    returns what must stay alive until qsl_engine_new has copied it (the
    sources)."""
    from qstack.loadgen.options import USTACK_PORTS, ustack_net
    net = ustack_net(o.ip)
    cfg.backend = lib.QSL_BACKEND_USTACK
    u = cfg.ustack
    if o.driver in ("dpdk", "memif"):
        u.driver = lib.QS_DRIVER_DPDK
        # memif: this process is the client of the server core's link of
        # the same number (one link per core, one load process per link)
        u.eal = (memif.eal_args(o.memif, "client", link, o.smp) if o.driver == "memif"
                 else o.eal).encode()
        u.dpdk_lib = (dpdk_library() or "").encode()
        # 02:00 + the address, as a TAP device gets: a memif port's own
        # address is the same at both ends of the pair
        u.mac = [0x02, 0x00, *int(net.ip).to_bytes(4, "big")]
    else:
        u.driver = lib.QS_DRIVER_TAP
        u.tap = o.tap.encode()
    u.ip = int(net.ip)
    u.prefix_len = net.network.prefixlen
    u.gateway = int(ipaddress.IPv4Address(o.gateway)) if o.gateway else 0
    u.max_conns = cfg.nconns + 1024     # this process's share
    u.buffers = max(USTACK_BUFFERS[0], min(USTACK_BUFFERS[1], 8 * cfg.nconns))
    u.snd_buf = u.rcv_buf = USTACK_SNDRCV
    u.syn_backlog = 128                 # no listener: the stack requires one anyway
    u.loss = o.loss
    u.fault_seed = o.seed
    # Every connection binds its own (address, port), no search: connection g
    # leaves from address g mod K of the K the stack owns (--ip, --ips K).
    from qstack.loadgen.options import ustack_sources
    addrs = [int(a) for a in ustack_sources(o)]
    u.ip_count = len(addrs)
    keep = ffi.new("uint32_t[]", addrs)
    cfg.nsources = len(addrs)
    cfg.sources = keep
    cfg.port_lo, cfg.port_hi = USTACK_PORTS
    return keep


def dpdk_library():
    """Path of the DPDK driver module (qstack/_qsdpdk*.so), or None."""
    import glob
    import os
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = glob.glob(os.path.join(here, "_qsdpdk*.so"))
    return found[0] if found else None


def _ustack_error(o, err: int, link: int = 0) -> str:
    import errno
    import os
    why = {errno.EPERM: "needs root (CAP_NET_ADMIN)", errno.EACCES: "needs root (CAP_NET_ADMIN)",
           errno.ENOENT: "/dev/net/tun is missing", errno.EBUSY: "the device is busy (another "
           "process has it open)"}.get(err, os.strerror(err))
    if o.driver == "memif":
        at = memif.link_path(o.memif, link, o.smp)
        why = {errno.ENODEV: f"DPDK made no memif port at {at}",
               errno.ENOTSUP: "DPDK is not available in this build"}.get(err, os.strerror(err))
        cores = f" --cores {o.smp}" if o.smp > 1 else ""
        return (f"the ustack client could not start memif at {at} (is `qstack serve{cores} "
                f"--driver memif --memif {o.memif}` up? it waits 30 s for it): {why}")
    if o.driver == "dpdk":
        why = {errno.ENODEV: "DPDK found no port (check --eal)",
               errno.ENOTSUP: "DPDK is not available in this build"}.get(err, os.strerror(err))
        return f"the ustack client could not start DPDK ({o.eal}): {why}"
    return f"the ustack client could not open TAP device {o.tap}: {why}"


class Engine:
    def __init__(self, o, times: EngineTimes, first: int, count: int, link: int = 0):
        cfg = ffi.new("qsl_config *")
        cfg.dest_addr = int(ipaddress.IPv4Address(o.host))
        cfg.dest_port = o.port
        cfg.protocol = PROTOCOLS[o.protocol]
        cfg.mode = MODES[o.mode]
        cfg.nconns = count
        cfg.first_conn = first
        cfg.total_conns = o.connections
        if o.ips:
            from qstack.loadgen.options import source_addresses
            addrs = [int(ipaddress.IPv4Address(a)) for a in source_addresses(o.ips, o.src)]
            sources = ffi.new("uint32_t[]", addrs)     # copied by qsl_engine_new
            cfg.nsources = len(addrs)
            cfg.sources = sources
            from qstack.loadgen.options import _port_range
            cfg.port_lo, cfg.port_hi = _port_range()
        cfg.msg_len = o.length
        cfg.reply_len = o.reply_len if o.protocol != "echo" else o.length
        if o.protocol == "script":
            from qstack.loadgen import script
            if script._current is None:   # not installed by the CLI (a direct runner.run)
                script.install(script.load(o.script, o.length), o.length)
            cfg.build, cfg.match = script.callbacks()
        cfg.burst = o.burst
        cfg.window = o.window
        cfg.ratio = o.ratio
        cfg.grain = GRAINS[o.grain]
        cfg.seed = o.seed
        cfg.t_start = times.start
        cfg.setup_ns = int(o.setup * NS)
        cfg.t_send = times.send
        cfg.t_meas = times.meas
        cfg.t_end = times.end
        cfg.drain_ns = times.drain_ns
        cfg.epoch_ns = int(o.epoch * NS)
        cfg.rate = o.rate
        cfg.retry_ns = int(o.retry_delay * NS)
        cfg.connect_timeout_ns = int(o.connect_timeout * NS)
        cfg.connect_inflight = o.connect_inflight
        cfg.spin_ns = int(o.spin * NS)
        cfg.reply_timeout_ns = int(o.reply_timeout * NS)
        if o.backend == "ustack":
            keep = _ustack(cfg, o, link)   # noqa: F841 (alive until qsl_engine_new copied it)
        elif o.backend == "uring":
            cfg.backend = lib.QSL_BACKEND_URING
        out = ffi.new("qsl_engine **")
        rc = lib.qsl_engine_new(cfg, out)
        if rc < 0:
            if o.backend == "ustack":
                raise OSError(-rc, _ustack_error(o, -rc, link))
            if o.backend == "uring":
                raise OSError(-rc, _uring_error(-rc))
            raise OSError(-rc, "qsl_engine_new refused the configuration or ran out of memory")
        self._e = out[0]
        self._stats = ffi.new("qsl_stats *")
        self._info = ffi.new("qsl_hist_info *")
        self._idx = ffi.new("uint32_t[]", lib.QSL_HIST_BUCKETS)
        self._cnt = ffi.new("uint64_t[]", lib.QSL_HIST_BUCKETS)

    def run(self, until_ns: int) -> bool:
        """Run the event loop until until_ns; True once the run is complete."""
        rc = lib.qsl_engine_run(self._e, until_ns)
        if rc < 0:
            raise OSError(-rc, "the load engine's event loop failed")
        return rc == lib.QSL_RUN_DONE

    def stop(self, drain_s: float) -> None:
        lib.qsl_engine_stop(self._e, int(drain_s * NS))

    def stats(self) -> dict[str, int]:
        lib.qsl_engine_stats(self._e, self._stats)
        s = self._stats
        return {name: getattr(s, name) for name in STAT_FIELDS}

    def hist(self, level: int, interval: bool = False, written: bool = False) -> Histogram:
        """The window's latencies of level (interval: since the last call;
        written: from when each request was written, not when it was due)."""
        which = (lib.QSL_HIST_INTERVAL if interval else
                 lib.QSL_HIST_SENT if written else lib.QSL_HIST_WINDOW)
        n = lib.qsl_engine_hist(self._e, level, which, self._info, self._idx, self._cnt,
                                lib.QSL_HIST_BUCKETS)
        if n < 0:
            raise OSError(-n, "qsl_engine_hist failed")
        i = self._info
        info = {"count": i.count, "min": i.min, "max": i.max, "sum": i.sum,
                "clamped": i.clamped}
        return Histogram.from_export(info, zip(self._idx[0:n], self._cnt[0:n]))

    def close(self) -> None:
        if self._e is not None:
            lib.qsl_engine_free(self._e)
            self._e = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
