"""Run one core in this process: listener, native stack thread, hub.

The frontend calls :func:`check_listen` once before anything starts (so a
busy port or Unix path is a start-up error, exit 2, even with several
cores) and then :func:`serve` in each core's process.  ``serve`` owns the process's signals:
the first SIGINT/SIGTERM drains gracefully (stop accepting, serve what
already arrived on accepted connections for a moment, stop reading, finish
queued requests within ``server.shutdown_grace``, flush replies, close); a
second SIGINT exits at once.  Every signal is logged with its name.

If the grace period runs out, the requests still queued or inside a handler
are dropped, counted (the last stats line carries ``dropped``), logged, and
serve() returns EXIT_DROPPED (3) instead of 0.

Under the supervisor (``stats_fd`` given) a core ignores SIGHUP (the
supervisor reloads), says ``ready`` on the stats pipe once it serves, and
stops by itself if its parent goes away (a second guard besides the
PR_SET_PDEATHSIG the supervisor set up).  Alone (one core, no supervisor)
SIGHUP cannot reload -- there is nobody to start the new core -- so it is
logged and ignored.
"""

import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import stat
import time

from .app import counters
from .config import Rule, listen_addresses, show_address
from .errors import ConfigError
from . import memif

__all__ = ["EXIT_DROPPED", "check_listen", "check_port", "kernel_sockets",
           "open_listener", "serve"]

log = logging.getLogger("qstack")

EXIT_DROPPED = 3        # the grace period ran out and requests were dropped
# seconds a stopping core still reads accepted connections.  A test switch
# (no "__": not a setting) shortens it for the test suite's servers, which
# otherwise spend a quarter second of every stop here; unset in production.
ACCEPT_LINGER = float(os.environ.get("QSTACK_TEST_ACCEPT_LINGER", "0.25"))
PARENT_CHECK = 0.5      # seconds between getppid() checks under the supervisor


def _addrinfo(host, port):
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    return infos[0]


def _bind(host, port, *, reuseport, backlog=None):
    family, type_, proto, _, addr = _addrinfo(host, port)
    options = [socket.SO_REUSEADDR] + ([socket.SO_REUSEPORT] if reuseport else [])
    return _listen(socket.socket(family, type_, proto), addr, backlog,
                   f"{host}:{port}", f"port {port} on {host}", options)


def _listen(sock, addr, backlog, where, in_use, options=()):
    """Set the SOL_SOCKET ``options``, bind ``sock`` to ``addr`` and listen
    (unless ``backlog`` is None); an error closes it and is one line naming
    ``where`` (``in_use`` when the address is taken)."""
    try:
        for opt in options:
            sock.setsockopt(socket.SOL_SOCKET, opt, 1)
        sock.bind(addr)
        if backlog is not None:
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"{in_use} is already in use") from None
        raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


def check_port(host, port):
    """Fail (ConfigError) if host:port is taken; returns the concrete port.

    The probe binds *without* SO_REUSEPORT, so another server that holds the
    port with SO_REUSEPORT (another qstack, say) is detected too.
    """
    sock = _bind(host, port, reuseport=False)
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def _check_unix(path):
    """Fail (ConfigError) unless a Unix socket can be bound at ``path``: its
    directory exists and nobody listens there.  A stale socket file (left by
    a server that was killed) is removed; any other file is an error."""
    where = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(where):
        raise ConfigError(f"unix:{path}: directory {where} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"unix:{path}: exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"unix:{path}: {exc.strerror or exc}") from None
        os.unlink(path)             # nobody listens: stale
        return
    finally:
        probe.close()
    raise ConfigError(f"unix:{path} is already in use (a server listens there)")


def check_listen(cfg):
    """Probe every listen address of ``cfg`` once, before any core starts
    (so a busy address is a start-up error, exit 2); returns ``cfg`` with
    port 0 replaced by the concrete port, since every core must bind the same."""
    srv = cfg.server
    addrs = listen_addresses(srv)
    fixed = []
    for addr in addrs:
        if addr[0] == "unix":
            _check_unix(addr[1])
            fixed.append(addr)
        else:
            fixed.append(("tcp", addr[1], check_port(addr[1], addr[2])))
    if srv.bind:
        srv = dataclasses.replace(srv, bind=tuple(show_address(a) for a in fixed))
    elif fixed[0][0] == "tcp":
        srv = dataclasses.replace(srv, port=fixed[0][2])
    return dataclasses.replace(cfg, server=srv)


def kernel_sockets(cfg):
    """Whether cfg's backend listens on kernel sockets (NativeCore.kernel_sockets):
    the frontend then probes the port, the supervisor binds one listener per
    core index, and a reload runs old and new cores side by side."""
    from .transport import backend_type
    return backend_type(cfg.server.backend).kernel_sockets


def open_listener(addr, backlog):
    """A listening socket for one address of listen_addresses(): TCP in this
    core's SO_REUSEPORT group, or a Unix socket (which has no such groups:
    one is bound for all cores and shared)."""
    if addr[0] == "tcp":
        return _bind(addr[1], addr[2], reuseport=True, backlog=backlog)
    where = "unix:" + addr[1]
    return _listen(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), addr[1], backlog,
                   where, where)


def unix_owner(sock):
    """(path, dev, inode) of a Unix listener we bound, for unlink_owned()."""
    path = sock.getsockname()
    st = os.stat(path)
    return path, st.st_dev, st.st_ino


def unlink_owned(owned):
    """Remove the socket files we bound, unless another server has since
    bound a new socket at the same path (a different inode)."""
    for path, dev, ino in owned:
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(path)
        except OSError:
            pass


def _conn_hooks(app, stream, load_callable):
    """app.on_connect / app.on_close, loaded in this core's process."""
    from .app.loader import check_handler
    hooks = {}
    for name in ("on_connect", "on_close"):
        spec = getattr(app, name)
        if spec is None:
            continue
        if stream:
            raise ConfigError(f"app.{name}: a stream handler gets its connection and "
                              "sees it close; the hooks are for message handlers")
        hooks[name] = load_callable(spec, f"app.{name}")
        check_handler(hooks[name], spec)
    return hooks


def _native_options(cfg, stream, stack_cpu, inline, conn_events=False):
    prio, native, app = cfg.priority, cfg.native, cfg.app
    rules = [(r.offset, r.value, r.mask, r.level) for r in prio.rules if isinstance(r, Rule)]
    http_rules = [(r.kind, r.level, r.name, r.value) for r in prio.rules
                  if not isinstance(r, Rule)]
    default_level = prio.default_level
    if prio.classifier:
        rules, default_level = [], 0        # Python classifies everything
    framing = dict(framing=app.framing.kind, frame_arg=app.framing.arg,
                   max_message=app.max_message)
    if app.wsgi is not None:
        framing = dict(framing="http", frame_arg=cfg.http.max_head,
                       max_message=cfg.http.max_body, max_line=cfg.http.max_line)
    return dict(
        levels=prio.levels, rules=rules, http_rules=http_rules, default_level=default_level,
        **framing, ring_size=native.ring_size,
        cmd_ring_size=native.cmd_ring_size, buf_size=native.buf_size,
        buf_count=native.buf_count, out_high_water=native.out_high_water,
        stream_mode=stream, conn_events=conn_events, stack_cpu=stack_cpu, inline=inline,
        reply_order=cfg.server.reply_order,
        buf_reserve=native.buf_reserve, partial_copy=native.partial_copy,
        max_large_bytes=native.max_large_bytes, max_out_bytes=native.max_out_bytes,
        message_timeout=cfg.server.message_timeout, idle_timeout=cfg.server.idle_timeout,
        write_timeout=cfg.server.write_timeout)


def dpdk_library():
    """Path of the DPDK driver module, or None if this build has none."""
    import glob
    found = glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_qsdpdk*.so"))
    return found[0] if found else None


def _ustack_settings(cfg, core_index=0):
    """The user-space stack's settings as qstack.transport takes them
    (core `core_index` of server.cores: on memif, link core_index)."""
    us = cfg.ustack
    lib_path, driver, eal, mac = None, us.driver, us.eal, us.mac
    if us.driver in ("dpdk", "memif"):
        lib_path = dpdk_library()
        if lib_path is None:
            raise ConfigError(f"ustack.driver: {us.driver}: DPDK is not available in this "
                              f"build (install libdpdk-dev and pkg-config, then rebuild "
                              f"with make)")
    if us.driver == "memif":                # DPDK's net_memif, this end the server
        links = cfg.server.cores            # one link per core (qstack/memif.py)
        try:
            memif.claim_socket(us.memif, core_index, links)
        except OSError as e:
            raise ConfigError(f"ustack.memif: {e.strerror}") from None
        driver, eal = "dpdk", memif.eal_args(us.memif, "server", core_index, links)
        # memif gives both ends of a link the same default MAC: take 02:00
        # and the address, as on TAP and as the load generator's client does
        mac = us.mac or memif.mac_for(us.ip.address)
    return dict(driver=driver, tap=us.tap, multiqueue=cfg.server.cores > 1,
                eal=eal, dpdk_lib=lib_path, mac=mac, name=us.driver,
                ip=us.ip.address, prefix=us.ip.prefix, gateway=us.gateway,
                max_conns=us.max_concurrency, buffers=us.buffers, snd_buf=us.snd_buf,
                rcv_buf=us.rcv_buf, syn_backlog=us.syn_backlog, loss=us.loss, dup=us.dup,
                reorder=us.reorder, corrupt=us.corrupt, fault_seed=us.fault_seed)


def _uring_error(cfg, exc, core_index=0):
    """The one line that says why io_uring cannot serve here (the probe's
    words: a build without liburing, or the kernel's refusal)."""
    return ConfigError(f"server.backend: uring: {exc.strerror or exc}; "
                       f"--backend kernel (or auto) serves without it")


def _ustack_error(cfg, exc, core_index=0):
    """The one line that says why the user-space stack could not start."""
    us = cfg.ustack
    link = memif.link_path(us.memif, core_index, cfg.server.cores) if us.memif else None
    dev = {"tap": f"TAP device {us.tap}", "memif": f"the memif port at {link}"}.get(
        us.driver, "the DPDK port")
    why = {
        errno.EPERM: f"opening {dev} needs root (CAP_NET_ADMIN)",
        errno.EACCES: f"opening {dev} needs root (CAP_NET_ADMIN)",
        errno.ENOENT: "/dev/net/tun is missing (no TUN/TAP support here)"
                      if us.driver == "tap" else "no DPDK port found (check --eal)"
                      if us.driver == "dpdk" else f"DPDK made no memif port at {link}",
        errno.EBUSY: f"{dev} is busy (another process has it open)",
        errno.EINVAL: f"{dev} is not a multi-queue device, which --cores "
                      f"{cfg.server.cores} needs (ip tuntap add dev {us.tap} mode tap multi_queue)"
                      if cfg.server.cores > 1 and us.driver == "tap" else None,
        errno.ENOTSUP: "DPDK is not available in this build",
        errno.ENODEV: "DPDK found no port (check the --eal arguments)",
        errno.ENOMEM: "not enough memory for ustack.buffers / ustack.max_concurrency",
    }.get(exc.errno)
    return ConfigError(f"ustack: {why or exc.strerror or exc}")


def snapshot(core_index, hub, watchdog=None):
    """This core's counters in the shape qstack.stats expects."""
    st = hub.core.stats()
    cpu_stack = st.stack_cpu_ns / 1e9
    # Inline, the stack's steps run in this thread: its CPU is counted apart.
    # (A step is charged its wall time, which can include preemption and
    # softirq work thread CPU time leaves out: clamp, never report < 0.)
    cpu_hub = max(time.thread_time() - (cpu_stack if hub.core.inline else 0.0), 0.0)
    queued = hub.queued()
    levels = []
    for lv in range(hub.core.levels):
        levels.append({
            "requests": st.rx_msgs[lv], "bytes_in": st.rx_bytes[lv],
            "replies": st.tx_msgs[lv], "bytes_out": st.tx_bytes[lv],
            "queued": st.ring_depth[lv] + queued[lv],
            "lat": list(st.lat[lv]),
        })
    return {"core": core_index, "t": time.monotonic(), "conns": st.conns_open,
            "accepted": st.conns_accepted, "bufs_in_use": st.bufs_in_use,
            "bufs_total": st.bufs_total, "cpu_stack": cpu_stack,
            "cpu_hub": cpu_hub, "errors": hub.errors,
            "protocol_errors": st.protocol_errors, "accept_errors": st.accept_errors,
            "paused_conns": st.paused_conns,
            **{k: getattr(st, k) for k in HOSTILE},
            "large_bytes": st.large_bytes, "out_heap_bytes": st.out_heap_bytes,
            "hub_blocks": watchdog.blocks if watchdog is not None else 0,
            "levels": levels, **_net_gauges(st), **_app_counters()}


def _net_gauges(st):
    if not st.net_bufs_total:       # the kernel backend
        return {}
    return {"net": {"tcbs": st.net_conns, "bufs_in_use": st.net_bufs_in_use,
                    "bufs_total": st.net_bufs_total, "rx_frames": st.net_rx_frames,
                    "tx_frames": st.net_tx_frames, "drops": st.net_drops,
                    "rexmit": st.net_rexmit, "tlp": st.net_tlp}}


def _app_counters():
    counts = counters.snapshot()
    return {"counters": counts} if counts else {}


def _app_init(app, load_callable):
    """Run app.init(settings) once in this core's process, before serving.

    Its failure is a start-up error: one line, exit 2, no restart (the
    supervisor forwards a core's ConfigError).  Any other exception is turned
    into one, since a traceback per core helps nobody find a typo'd path.
    """
    if app.init is None:
        return
    init = load_callable(app.init, "app init")
    try:
        init(dict(app.settings))
    except ConfigError:
        raise
    except Exception as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"app init {app.init} failed: {type(exc).__name__}: {text}") from None


def serve(cfg, handler, core_index=0, stats_fd=None, listen_fds=None, stop_fd=None):
    """Serve until a signal asks to stop; returns the exit code.

    ``listen_fds`` are listening sockets the supervisor made and keeps (kernel
    backend), one per listen address; without them this core binds its own
    (and removes the Unix socket files it bound when it returns).  ``stop_fd`` (qstack.serve's
    handle) stops it as SIGTERM does once it becomes readable.  Outside the
    main thread no signal handler can be installed: only ``stop_fd`` stops it.
    """
    owned = []                  # Unix socket files this core bound itself
    try:
        return _serve(cfg, handler, core_index, stats_fd, listen_fds, stop_fd, owned)
    finally:
        unlink_owned(owned)


def _serve(cfg, handler, core_index, stats_fd, listen_fds, stop_fd, owned):
    import gevent
    from gevent.event import Event

    from .app import Connection, Request
    from .app.loader import load_callable
    from .coro import Hub, StreamHub
    from .transport import NativeCore, lib
    from .coro.watchdog import BlockWatchdog
    from .layout import plan, stack_inline

    # Until the handlers below are in place a SIGHUP would kill the core
    # (its default action); a hang-up or reload request is never a crash.
    import threading
    main_thread = threading.current_thread() is threading.main_thread()
    # A SIGTERM before them (the port may already accept: the supervisor's
    # listener) is kept and acted on once they are, not a kill by default.
    early = []
    if main_thread:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda signum, frame: early.append(signum))
    srv = cfg.server
    stream = bool(getattr(handler, "__qstack_stream__", False))
    classifier = (load_callable(cfg.priority.classifier, "priority classifier")
                  if cfg.priority.classifier else None)
    allowed = sorted(os.sched_getaffinity(0))
    stack_cpu, hub_cpu = plan(cfg.layout.pin, core_index, allowed)
    inline = stack_inline(cfg.layout.stack, cfg.layout.pin, srv.cores, allowed)
    if hub_cpu is not None:
        os.sched_setaffinity(0, {hub_cpu})      # this thread only
    _app_init(cfg.app, load_callable)
    metrics_sock = None
    if cfg.metrics.listen is not None and stats_fd is None:
        # One core, no supervisor: this process answers the scrapes.
        from .metrics import bind
        metrics_sock = bind(cfg.metrics.listen)
        log.info("metrics on http://%s:%d/metrics", *metrics_sock.getsockname()[:2])
    hooks = _conn_hooks(cfg.app, stream, load_callable)
    options = _native_options(cfg, stream, stack_cpu, inline, conn_events=bool(hooks))
    core = _open_core(cfg, options, listen_fds, owned, core_index)
    where = _where(core, srv)
    if cfg.log.access and not stream and cfg.app.wsgi is None:   # WSGI logs its own
        from .app.access import access_logged
        handler = access_logged(handler, cfg.log.access_sample)
    hub_type = StreamHub if stream else Hub
    hub = hub_type(core, handler, workers=srv.workers,
                   low_share=cfg.priority.low_share, classifier=classifier,
                   batch=cfg.native.batch, make_request=Request,
                   make_connection=Connection, reserve=cfg.priority.reserve, **hooks)
    core.start()
    hub.start()
    watchdog = None
    if srv.block_warning > 0:
        # The core flushing its last replies at stop waits on purpose.
        watchdog = BlockWatchdog(gevent.get_hub().loop, srv.block_warning,
                                 f"core {core_index}",
                                 quiet=(NativeCore.shutdown.__code__,)).start()
    log.info("core %d serving %s (%s backend, %s handler, %d workers, %s stack, pid %d)",
             core_index, where, core.name, "stream" if stream else "message",
             srv.workers, "inline" if inline else "threaded", os.getpid())

    done = Event()
    stopping = []
    dropped = [0]
    supervised = stats_fd is not None
    if supervised:
        _write_line(stats_fd, {"ready": os.getpid()})

    def outstanding():
        return hub.pending() + hub.busy_workers()

    def stop():
        # Stop accepting first and keep reading a moment: a client that
        # connected just before sends its request right after, and with a
        # listener shared by the supervisor, what waits in the accept queue
        # goes to the next core on it.
        hub.post(lib.QS_CMD_STOP_ACCEPT, 0, 0)
        gevent.sleep(min(ACCEPT_LINGER, srv.shutdown_grace / 2))
        # Count what is left when the grace period runs out: drain() only
        # says whether it was clean, so a watcher samples until then.
        deadline = time.monotonic() + srv.shutdown_grace
        last = [0]

        def watch():
            while time.monotonic() < deadline:
                last[0] = outstanding()
                gevent.sleep(0.002)
        watcher = gevent.spawn(watch)
        clean = hub.drain(srv.shutdown_grace)
        watcher.kill()
        if not clean:
            dropped[0] = max(last[0], 1)
            log.warning("core %d: grace period of %.1fs ran out; %d request(s) dropped",
                        core_index, srv.shutdown_grace, dropped[0])
        done.set()

    def on_signal(signum):
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            log.warning("core %d: SIGHUP: reloading needs the supervisor (--cores 2 or "
                        "more); ignored, still serving", core_index)
            return
        if stopping:
            if signum == signal.SIGINT:
                log.warning("core %d: second SIGINT: exiting at once", core_index)
                os._exit(1)
            log.info("core %d: %s: already stopping", core_index, name)
            return
        log.info("core %d: %s: stopping (grace %.1fs)", core_index, name, srv.shutdown_grace)
        stopping.append(signum)
        gevent.spawn(stop)

    def watch_parent(parent):
        while not stopping:
            gevent.sleep(PARENT_CHECK)
            if os.getppid() != parent and not stopping:
                log.warning("core %d: the supervisor (pid %d) is gone: stopping",
                            core_index, parent)
                stopping.append(0)
                gevent.spawn(stop)

    def watch_stop_fd():
        hub_ = gevent.get_hub()
        hub_.wait(hub_.loop.io(stop_fd, 1))     # 1: readable
        on_signal(signal.SIGTERM)

    if main_thread:
        gevent.signal_handler(signal.SIGTERM, on_signal, signal.SIGTERM)
        gevent.signal_handler(signal.SIGINT, on_signal, signal.SIGINT)
    if supervised:
        gevent.spawn(watch_parent, os.getppid())
    elif main_thread:
        gevent.signal_handler(signal.SIGHUP, on_signal, signal.SIGHUP)
    stop_watcher = gevent.spawn(watch_stop_fd) if stop_fd is not None else None
    for signum in early:
        on_signal(signum)

    reporter = None
    if stats_fd is not None or srv.stats:
        reporter = gevent.spawn(_report_stats, core_index, hub, stats_fd,
                                srv.stats_interval, watchdog, srv.stats_format)
    metrics = None
    if metrics_sock is not None:
        from .metrics import Aggregate, render, serve_gevent
        agg = Aggregate(1)

        def scrape():
            agg.update(os.getpid(), snapshot(core_index, hub, watchdog))
            return render(agg)
        metrics = serve_gevent(metrics_sock, scrape)
    native_errors = _NativeErrors(core_index, hub.core)
    teller = gevent.spawn(_tell_native_errors, hub, native_errors)
    done.wait()
    if stop_watcher is not None:
        stop_watcher.kill()
    if metrics is not None:
        metrics.stop()
    teller.kill()
    if reporter is not None:
        reporter.kill()
    if watchdog is not None:
        watchdog.stop()
    if getattr(hub, "said", None) is not None:
        hub.said.flush()            # handler errors not yet said in full
    final = snapshot(core_index, hub, watchdog)
    final["dropped"] = dropped[0]
    native_errors.check(final, time.monotonic(), force=True)
    if stats_fd is not None:
        _write_line(stats_fd, final)
    log.info("core %d stopped: %d requests, %d handler errors, %d protocol errors, "
             "%d accept errors, %d paused connections, %d hub blocks, "
             "%d message timeouts, %d idle timeouts, %d write timeouts, %d quota closes, "
             "buffers in use %d, cpu stack %.3fs hub %.3fs", core_index,
             sum(lv["requests"] for lv in final["levels"]), hub.errors,
             final["protocol_errors"], final["accept_errors"], final["paused_conns"],
             final["hub_blocks"], *(final[k] for k in HOSTILE), final["bufs_in_use"],
             final["cpu_stack"], final["cpu_hub"])
    if final.get("net"):
        net = final["net"]
        log.info("core %d ustack: %d frames in, %d out, %d dropped, %d retransmitted, "
                 "%d tail probes, packet buffers in use %d", core_index, net["rx_frames"],
                 net["tx_frames"], net["drops"], net["rexmit"], net["tlp"], net["bufs_in_use"])
    if final.get("counters"):
        from .stats import format_counters
        log.info("core %d counters: %s", core_index,
                 format_counters(final["counters"], len(final["levels"])).strip())
    if final["bufs_in_use"] == 0:
        core.free()
    return EXIT_DROPPED if dropped[0] else 0


def _open_core(cfg, options, listen_fds, owned, core_index=0):
    """This core's NativeCore, listening on every listen address (kernel
    sockets) or on server.port (ustack).  One path for every backend
    (qstack.transport.open_core); what a backend adds are its own settings
    and the words for its errors (the tables below)."""
    from .transport import backend_type, open_core
    srv = cfg.server
    socks = []                  # (sock, port to check, 0 for Unix)
    if backend_type(srv.backend).kernel_sockets:
        addrs = listen_addresses(srv)
        if listen_fds is not None:
            # the supervisor's listeners, shared by this core index
            socks = [(socket.socket(fileno=fd), a[2] if a[0] == "tcp" else 0)
                     for fd, a in zip(listen_fds, addrs)]
        else:
            try:
                for a in addrs:
                    sock = open_listener(a, srv.backlog)
                    socks.append((sock, a[2] if a[0] == "tcp" else 0))
                    if a[0] == "unix":
                        owned.append(unix_owner(sock))
            except ConfigError:
                for sock, _ in socks:
                    sock.close()
                raise
    try:
        core = open_core(srv.backend, **options,
                         **_BACKEND_SETTINGS.get(srv.backend, _no_settings)(cfg, core_index))
    except (OSError, ValueError) as exc:
        for sock, _ in socks:
            sock.close()
        explain = _BACKEND_ERRORS.get(srv.backend)
        if isinstance(exc, OSError) and explain is not None:
            raise explain(cfg, exc, core_index) from None
        raise ConfigError(f"{srv.backend}: cannot create the native core: {exc}") from None
    try:
        if not socks:
            core.listen(port=srv.port)
        while socks:
            sock, port = socks.pop(0)
            # the core owns the fd from here on (closed by qs_core_free)
            core.listen(port=port, fd=sock.detach())
    except OSError as exc:
        for sock, _ in socks:
            sock.close()
        core.free()
        raise ConfigError(f"{srv.backend}: cannot listen on {_where(core, srv)}: "
                          f"{exc.strerror or exc}") from None
    return core


def _where(core, srv):
    """What this core serves, as the log line says it."""
    return core.where([show_address(a) for a in listen_addresses(srv)], srv.port)


def _no_settings(cfg, core_index):
    return {}


# A backend's settings beyond the common options, from its config section,
# and the words for its start-up errors (OSError -> ConfigError).
_BACKEND_SETTINGS = {"ustack": lambda cfg, core: {"settings": _ustack_settings(cfg, core)}}
_BACKEND_ERRORS = {"ustack": _ustack_error, "uring": _uring_error}


def _write_line(fd, snap):
    try:
        os.write(fd, (json.dumps(snap, separators=(",", ":")) + "\n").encode())
    except OSError:
        pass                          # the supervisor is gone; keep serving


def _report_stats(core_index, hub, stats_fd, interval, watchdog=None, fmt="text"):
    import gevent

    from .stats import StatsView, stats_lines

    view = StatsView()
    while True:
        gevent.sleep(interval)
        snap = snapshot(core_index, hub, watchdog)
        if stats_fd is not None:
            _write_line(stats_fd, snap)
        else:
            for line in stats_lines(view, [snap], fmt):
                print(line, flush=True)


NATIVE_ERRORS_EVERY = 1.0   # seconds between checks of the native error counters
# connections the native layer closed against hostile peers (conn.c), per cause
HOSTILE = ("timeouts_message", "timeouts_idle", "timeouts_write", "quota_closes")


class _NativeErrors:
    """Says, at warning level and rate-limited, the errors the native layer
    only counts (it cannot log: no C thread takes the GIL).  Each line names
    the peer of the latest occurrence, which the native layer keeps per
    cause (qs_core_peer with -QS_CLOSED_*)."""

    def __init__(self, core_index, core=None):
        from .coro.errlog import CounterWatch, peer_name
        from .transport import lib
        self.core_index = core_index
        why = {"protocol_errors": lib.QS_CLOSED_PROTOCOL,
               "timeouts_message": lib.QS_CLOSED_MESSAGE,
               "timeouts_idle": lib.QS_CLOSED_IDLE,
               "timeouts_write": lib.QS_CLOSED_WRITE,
               "quota_closes": lib.QS_CLOSED_QUOTA}
        self.peers = {name: (lambda w=w: peer_name(core.peer(-w)))
                      for name, w in why.items()} if core is not None else {}
        self.watches = {
            "protocol_errors": CounterWatch(
                "protocol errors", "oversized or malformed messages, each connection "
                "reset (HTTP: answered 400/413/414/431/505, then closed)"),
            "accept_errors": CounterWatch(
                "accept errors", "accept() failed, e.g. out of file descriptors"),
            "timeouts_message": CounterWatch(
                "message timeouts", "connections reset: a message started and not "
                "finished within server.message_timeout (slowloris?)"),
            "timeouts_idle": CounterWatch(
                "idle timeouts", "connections closed: nothing read or written for "
                "server.idle_timeout"),
            "timeouts_write": CounterWatch(
                "write timeouts", "connections reset: the peer read none of its replies "
                "for server.write_timeout"),
            "quota_closes": CounterWatch(
                "quota closes", "connections reset: a message needed memory beyond "
                "native.max_large_bytes, or the pool was down to its reserve"),
        }

    def check(self, snap, now, force=False):
        for name, watch in self.watches.items():
            line = watch.update(snap.get(name, 0), now, force, self.peers.get(name))
            if line:
                log.warning("core %d: %s", self.core_index, line)


def _tell_native_errors(hub, native_errors):
    import gevent

    core = hub.core
    while True:
        gevent.sleep(NATIVE_ERRORS_EVERY)
        if core.inline:
            # The timeouts are swept in the stack's steps: an idle inline hub
            # takes none by itself, so take one now (commands, timeouts).
            hub._step(core.NO_POLL)     # wakes a sleeping leader if it published
        st = core.stats()
        native_errors.check({"protocol_errors": st.protocol_errors,
                             "accept_errors": st.accept_errors,
                             **{k: getattr(st, k) for k in HOSTILE}}, time.monotonic())
