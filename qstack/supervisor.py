"""One process per core, kept alive: the parent of ``qstack serve --cores N``.

Why processes: one GIL per core.  Each child runs ``server.serve`` for its
core index and binds the port itself with SO_REUSEPORT; the parent checked
the port once before forking and never serves.

Invariants and the reasons for them:

* The parent stays a plain single-threaded process: no gevent hub, no
  threads, no native core.  fork() copies only the calling thread, so a
  parent holding a running hub or a stack thread would hand its children
  half-alive state (locks held by threads that do not exist in the child).
* Everything the parent waits for arrives on file descriptors watched by one
  selector: a pipe per child (stats JSON lines, and a fatal start-up error)
  and the signal wakeup pipe (signal.set_wakeup_fd), so SIGCHLD, SIGINT and
  SIGTERM wake the loop without races and without threads.  Signal handlers
  only record the signal; the loop acts on it.
* Every wait is bounded: restarts back off (0.1 s doubling to 5 s), a core
  failing 5 times within 10 s stops everything (exit 2) instead of spinning,
  and shutdown kills what has not exited within shutdown_grace + 2 s.

* Cores die with the supervisor.  Each child asks the kernel for SIGTERM
  when its parent dies (PR_SET_PDEATHSIG) and then checks that its parent
  is still the pid that forked it, which covers a supervisor killed between
  fork() and prctl(); serve() also watches getppid() while it runs.  So a
  ``kill -9`` of the supervisor leaves no orphan holding the port.
* On the kernel backend the supervisor binds, for each listen address, one
  SO_REUSEPORT listener per core index and keeps it (a Unix socket has no
  such groups: one listener, shared by every core, whose file the supervisor
  removes when it exits); a core (and its replacement after a crash or a
  reload) accepts from that socket.  Connections waiting in a listener's
  accept queue therefore survive the core that stopped accepting them: the
  next core on that socket takes them.  (Listeners bound per process would
  reset their queue on close.)

Reload (SIGHUP), as gunicorn: the supervisor re-imports the handler (a
failed import is logged and the running cores keep serving), then starts a
new generation of cores.  On the kernel backend old and new overlap: once
every new core says it is ready, the old ones get SIGTERM -- they stop
accepting, serve what is already on their connections for a moment, finish
their in-flight requests within shutdown_grace and exit.  The user-space
stack owns its TAP device or DPDK port and cannot run two generations at
once, so there the cores are restarted in place, one at a time (the log
says so).  A new core that fails before it is ready aborts the reload; the
old generation stays.

A child that exits with status 0 on its own has finished (someone stopped
it); only non-zero exits and deaths by signal are restarted.  Status 3 means
the grace period ran out and requests were dropped (the child reports how
many in its last stats line); on stop the supervisor then exits 3 too.  A ConfigError
raised inside serve() before serving travels up the child's pipe so that the
user sees one ``qstack: error:`` line, not one per core, and nothing restarts.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import selectors
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field

from qstack.errors import ConfigError
from qstack.server import kernel_sockets
from qstack.stats import StatsView, stats_lines

log = logging.getLogger("qstack.supervisor")

EXIT_DROPPED = 3                 # the grace period ran out; requests were dropped
PR_SET_PDEATHSIG = 1
READY_TIMEOUT = 30.0             # a new generation not ready by then is abandoned


def die_with_parent(parent: int) -> None:
    """Get SIGTERM when ``parent`` dies; exit now if it already has.

    Called in a freshly forked child.  The prctl only covers deaths after
    it is made; the getppid() check covers the window since fork().
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass                      # not Linux: serve()'s getppid() watch remains
    if os.getppid() != parent:
        os._exit(0)


@dataclass
class _Child:
    core: int
    pid: int
    fd: int                      # read end of the child's stats pipe
    started: float
    gen: int = 0                 # the reload generation it belongs to
    buf: bytes = b""
    fatal: str | None = None     # ConfigError message the child reported
    ready: bool = False          # said it serves (or sent stats)
    retiring: bool = False       # asked to stop by a reload
    dropped: int = 0             # requests dropped when its grace ran out


@dataclass
class _Core:
    failures: list[float] = field(default_factory=list)  # recent failure times
    restart_at: float | None = None


def describe_status(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


class Supervisor:
    RESTART_MIN = 0.1
    RESTART_MAX = 5.0
    FAIL_LIMIT = 5
    FAIL_WINDOW = 10.0
    KILL_AFTER = 2.0             # extra seconds past shutdown_grace

    def __init__(self, cfg, handler, serve=None, reload_handler=None):
        """``serve`` defaults to qstack.server.serve; tests pass a fake.

        ``reload_handler()`` returns the handler re-imported (or raises
        ConfigError); without it a reload restarts the cores with the same
        handler object.
        """
        self.cfg = cfg
        self.handler = handler
        self._serve = serve
        self._reload_handler = reload_handler
        self._pid = os.getpid()
        self._listeners: list[list[int]] = []    # kernel backend: fds per core index
        self._owned: list[tuple] = []            # Unix socket files we bound
        self._gen = 0                            # the generation that serves
        self._next: int | None = None            # the generation being started
        self._next_started = 0.0
        self._roll: list[int] = []               # in-place reload: cores still to restart
        self._dropped = 0
        self._old_handler = handler
        self._children: dict[int, _Child] = {}   # by pid
        self._cores = [_Core() for _ in range(cfg.server.cores)]
        self._signals: list[int] = []
        self._stopping = False
        self._deadline = 0.0
        self._code = 0
        self._error: str | None = None
        self._view = StatsView()
        self._snapshots: dict[int, dict] = {}     # newest per core since last print
        self._metrics = None                      # SelectorHTTP when --metrics
        self._aggregate = None                    # qstack.metrics.Aggregate

    # --- public -------------------------------------------------------------

    def run(self) -> int:
        """Fork the cores and supervise them until stopped; return exit status."""
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in _SIGNALS}
        try:
            self._open_listeners()
            self._open_metrics()
            for core in range(len(self._cores)):
                self._spawn(core)
            code = self._loop()
        finally:
            self._kill_all()          # only does something if we are unwinding
            for fd in {fd for fds in self._listeners for fd in fds}:
                os.close(fd)
            self._listeners = []
            from qstack.server import unlink_owned
            unlink_owned(self._owned)
            self._owned = []
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self._sel.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
        if self._error is not None:
            raise ConfigError(self._error)
        return code

    # --- children -----------------------------------------------------------

    def _open_listeners(self) -> None:
        """Per listen address, one SO_REUSEPORT listener per core index (a Unix
        socket: one for all), kept across restarts and reloads."""
        srv = self.cfg.server
        if self._serve is not None or not kernel_sockets(self.cfg):
            return                    # a fake serve, or a backend without kernel sockets
        from qstack.config import listen_addresses
        from qstack.server import open_listener, unix_owner
        self._listeners = [[] for _ in self._cores]
        for addr in listen_addresses(srv):
            if addr[0] == "unix":
                sock = open_listener(addr, srv.backlog)
                self._owned.append(unix_owner(sock))
                fd = sock.detach()
                for fds in self._listeners:
                    fds.append(fd)
            else:
                for fds in self._listeners:
                    fds.append(open_listener(addr, srv.backlog).detach())

    def _open_metrics(self) -> None:
        """--metrics: scrapes answered from this loop (no thread: we fork)."""
        listen = self.cfg.metrics.listen
        if listen is None:
            return
        from qstack.metrics import Aggregate, SelectorHTTP, bind, render
        self._aggregate = agg = Aggregate(len(self._cores))
        self._metrics = SelectorHTTP(bind(listen), lambda: render(agg))
        self._metrics.attach(self._sel)
        host, port = self._metrics.sock.getsockname()[:2]
        log.info("metrics on http://%s:%d/metrics", host, port)

    def _spawn(self, core: int, gen: int | None = None) -> None:
        gen = self._gen if gen is None else gen
        r, w = os.pipe()
        sys.stdout.flush()            # or buffered output is written twice
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            self._child_main(core, w)  # never returns
        os.close(w)
        os.set_blocking(r, False)
        self._sel.register(r, selectors.EVENT_READ, core)
        self._children[pid] = _Child(core, pid, r, time.monotonic(), gen)
        self._cores[core].restart_at = None
        log.debug("core %d started as pid %d (generation %d)", core, pid, gen)

    def _child_main(self, core: int, stats_fd: int) -> None:
        code = 1
        try:
            die_with_parent(self._pid)
            # Undo the parent's signal plumbing; serve() installs its own.
            # SIGHUP is the supervisor's business (a terminal hang-up reaches
            # the whole process group): cores ignore it.
            signal.set_wakeup_fd(-1)
            for s in _SIGNALS:
                signal.signal(s, signal.SIG_IGN if s == signal.SIGHUP else signal.SIG_DFL)
            self._sel.close()
            if self._metrics is not None:
                self._metrics.close_in_child()
            for fd in [self._wake_r, self._wake_w] + [c.fd for c in self._children.values()]:
                os.close(fd)
            kwargs = {}
            if self._listeners:
                mine = self._listeners[core]
                kwargs["listen_fds"] = mine
                for fd in {fd for fds in self._listeners for fd in fds} - set(mine):
                    os.close(fd)
            serve = self._serve
            if serve is None:
                from qstack.server import serve
            code = serve(self.cfg, self.handler, core_index=core, stats_fd=stats_fd, **kwargs)
            code = 0 if code is None else int(code)
        except ConfigError as e:
            line = json.dumps({"core": core, "fatal": str(e)}) + "\n"
            try:
                os.write(stats_fd, line.encode())
            except OSError:
                pass
            code = 2
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _read(self, child: _Child) -> None:
        while True:
            try:
                data = os.read(child.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._sel.unregister(child.fd)
                os.close(child.fd)
                child.fd = -1
                return
            child.buf += data
            *lines, child.buf = child.buf.split(b"\n")
            for line in lines:
                self._message(child, line)

    def _message(self, child: _Child, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            log.debug("core %d: unreadable stats line %r", child.core, line[:80])
            return
        if not isinstance(msg, dict):
            return
        if "fatal" in msg:
            child.fatal = str(msg["fatal"])
        elif "ready" in msg:
            child.ready = True
        elif "levels" in msg:
            child.ready = True
            if isinstance(msg.get("dropped"), int):
                child.dropped = msg["dropped"]
            if self._aggregate is not None:
                # Every generation counts here (by pid): totals stay monotonic.
                self._aggregate.update(child.pid, msg)
            if child.gen != self._gen:
                return                # an old or a starting generation: not in the totals
            msg["core"] = child.core
            self._snapshots[child.core] = msg

    # --- the loop -----------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self._signals.append(signum)   # acted on by the loop

    def _loop(self) -> int:
        stats = self.cfg.server.stats
        # Print a block as soon as every running core has reported, so the
        # lines of one interval stay together; a core that is late (or
        # restarting) delays the block by at most half an interval.
        patience = 1.5 * self.cfg.server.stats_interval
        last_print = time.monotonic()
        while True:
            now = time.monotonic()
            wake = [now + 1.0]
            wake += [c.restart_at for c in self._cores if c.restart_at is not None]
            if self._stopping:
                wake.append(self._deadline)
            if stats and self._snapshots:
                wake.append(last_print + patience)
            for key, _ in self._sel.select(max(0.0, min(wake) - now)):
                if key.data is None:
                    self._drain_wakeup()
                elif callable(key.data):
                    key.data()        # a metrics scrape
                else:
                    child = next((c for c in self._children.values() if c.fd == key.fd), None)
                    if child is not None:
                        self._read(child)
            while self._signals:
                if self._handle_signal(self._signals.pop(0)):
                    self._kill_all()
                    return 1
            self._reap()
            now = time.monotonic()
            if self._metrics is not None:
                self._metrics.expire(now)
            if not self._stopping:
                for core, state in enumerate(self._cores):
                    if state.restart_at is not None and now >= state.restart_at:
                        self._spawn(core)
                self._reload_step(now)
            if stats and self._snapshots and (
                    now >= last_print + patience or
                    all(c.core in self._snapshots for c in self._children.values())):
                last_print = now
                self._print_stats()
            if not self._children and all(c.restart_at is None for c in self._cores):
                if self._code == EXIT_DROPPED:
                    log.warning("grace period ran out: %d request(s) dropped; exit status %d",
                                self._dropped, EXIT_DROPPED)
                return self._code
            if self._stopping and now >= self._deadline:
                log.warning("killing %d core(s) still running after %.1f s",
                            len(self._children), self.cfg.server.shutdown_grace + self.KILL_AFTER)
                self._kill_all()
                return self._code

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _handle_signal(self, signum: int) -> bool:
        """Returns True when the children must die at once (second SIGINT)."""
        if signum == signal.SIGCHLD:
            return False
        if signum == signal.SIGHUP:
            if not self._stopping:
                self._start_reload()
            return False
        if self._stopping:
            return signum == signal.SIGINT
        log.info("%s: stopping %d core(s)", signal.Signals(signum).name, len(self._children))
        self._stop(0)
        return False

    # --- reload ---------------------------------------------------------------

    def _start_reload(self) -> None:
        if self._next is not None:
            log.warning("SIGHUP: a reload is already under way (generation %d); ignored",
                        self._next)
            return
        self._old_handler = self.handler
        if self._reload_handler is not None:
            try:
                self.handler = self._reload_handler()
            except ConfigError as e:
                log.error("SIGHUP: reload failed, the running cores keep serving: %s", e)
                return
        self._next = self._gen + 1
        self._next_started = time.monotonic()
        if kernel_sockets(self.cfg):
            log.info("SIGHUP: reloading: starting %d new core(s); the old ones stop "
                     "once the new ones serve", len(self._cores))
            for core in range(len(self._cores)):
                self._spawn(core, self._next)
        else:
            log.info("SIGHUP: reloading in place: %s cannot run old and new cores at "
                     "once, so each core is stopped and restarted in turn",
                     self.cfg.server.backend)
            self._roll = list(range(len(self._cores)))

    def _reload_step(self, now: float) -> None:
        """Advance a reload: retire the old generation or roll the next core."""
        if self._next is None:
            return
        new = [c for c in self._children.values() if c.gen == self._next]
        if self._roll:
            if any(not c.ready for c in new) or any(c.retiring for c in self._children.values()):
                pass                  # one core at a time
            else:
                core = self._roll.pop(0)
                for c in self._children.values():
                    if c.core == core and c.gen == self._gen:
                        c.retiring = True
                        _kill(c.pid, signal.SIGTERM)
                        log.info("reload: stopping core %d (pid %d)", core, c.pid)
                        break
                else:
                    self._spawn(core, self._next)
            return
        if any(c.retiring for c in self._children.values() if c.gen != self._next) \
                and not kernel_sockets(self.cfg):
            return                    # the last in-place core has not exited yet
        if len(new) == len(self._cores) and all(c.ready for c in new):
            old = [c for c in self._children.values() if c.gen != self._next]
            for c in old:
                if not c.retiring:
                    c.retiring = True
                    _kill(c.pid, signal.SIGTERM)
            self._gen, self._next = self._next, None
            for state in self._cores:
                state.failures.clear()
            log.info("reload: generation %d serves (pids %s); %d old core(s) finishing",
                     self._gen, " ".join(str(c.pid) for c in new), len(old))
        elif now - self._next_started > READY_TIMEOUT:
            self._abort_reload(f"new cores not ready within {READY_TIMEOUT:g} s")

    def _abort_reload(self, why: str) -> None:
        log.error("reload failed (%s); the old cores keep serving", why)
        overlap = kernel_sockets(self.cfg)
        for c in self._children.values():
            if c.gen != self._next:
                continue
            if overlap or not c.ready:
                c.retiring = True
                _kill(c.pid, signal.SIGTERM)
            else:
                c.gen = self._gen     # in place, already serving: keep it
        self.handler = self._old_handler
        self._next = None
        self._roll = []
        for core in range(len(self._cores)):
            if not any(c.core == core for c in self._children.values()) and \
                    self._cores[core].restart_at is None:
                self._spawn(core)

    def _stop(self, code: int) -> None:
        self._stopping = True
        self._code = code
        self._deadline = time.monotonic() + self.cfg.server.shutdown_grace + self.KILL_AFTER
        for state in self._cores:
            state.restart_at = None
        for child in self._children.values():
            _kill(child.pid, signal.SIGTERM)

    def _kill_all(self) -> None:
        for child in self._children.values():
            _kill(child.pid, signal.SIGKILL)
        for pid in list(self._children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self._forget(self._children[pid])

    def _forget(self, child: _Child) -> None:
        if child.fd >= 0:
            self._read(child)     # the last lines may hold a fatal error
        if child.fd >= 0:
            self._sel.unregister(child.fd)
            os.close(child.fd)
            child.fd = -1
        self._children.pop(child.pid, None)
        if self._aggregate is not None:
            self._aggregate.retire(child.pid)

    def _reap(self) -> None:
        for pid in list(self._children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                child = self._children[pid]
                self._forget(child)
                self._exited(child, status)

    def _exited(self, child: _Child, status: int) -> None:
        what = describe_status(status)
        code = os.waitstatus_to_exitcode(status)
        if code == EXIT_DROPPED:
            self._dropped += child.dropped
            log.warning("core %d (pid %d): grace period ran out, %d request(s) dropped",
                        child.core, child.pid, child.dropped)
        if self._stopping:
            log.debug("core %d (pid %d) %s", child.core, child.pid, what)
            if code == EXIT_DROPPED and self._code == 0:
                self._code = EXIT_DROPPED
            return
        if child.retiring:
            log.info("old core %d (pid %d) %s", child.core, child.pid, what)
            if not any(c.core == child.core for c in self._children.values()):
                # In place: its successor.  After an aborted reload: its
                # predecessor, which had to leave the device first.
                self._spawn(child.core, self._gen if self._next is None else self._next)
            return
        if self._next is not None and child.gen == self._next:
            self._abort_reload(f"new core {child.core} (pid {child.pid}) {what}"
                               + (f": {child.fatal}" if child.fatal else ""))
            return
        if child.gen != self._gen and self._next is None:
            return                    # left over from an aborted reload
        if child.fatal is not None:
            self._error = child.fatal
            self._stop(2)
            return
        if os.waitstatus_to_exitcode(status) == 0:
            log.warning("core %d (pid %d) exited with status 0; not restarting",
                        child.core, child.pid)
            return
        now = time.monotonic()
        state = self._cores[child.core]
        if now - child.started >= self.FAIL_WINDOW:
            state.failures.clear()    # it was healthy for a while: start over
        state.failures = [t for t in state.failures if now - t < self.FAIL_WINDOW] + [now]
        if len(state.failures) >= self.FAIL_LIMIT:
            print(f"qstack: error: core {child.core} failed {len(state.failures)} times "
                  f"within {self.FAIL_WINDOW:g} s (last: pid {child.pid} {what}); "
                  "giving up", file=sys.stderr, flush=True)
            self._stop(2)
            return
        delay = min(self.RESTART_MIN * 2 ** (len(state.failures) - 1), self.RESTART_MAX)
        if self._next is not None and child.gen == self._gen:
            # Crashed while a reload starts its successor: nothing to restart
            # on the kernel backend (the new core i takes over).
            if kernel_sockets(self.cfg):
                log.warning("core %d (pid %d) %s during a reload", child.core, child.pid, what)
                return
        state.restart_at = now + delay
        self._view.forget(child.core)
        if self._aggregate is not None:
            self._aggregate.restarted(child.core)
        log.warning("core %d (pid %d) %s; restarting in %.1f s",
                    child.core, child.pid, what, delay)

    def _print_stats(self) -> None:
        snaps, self._snapshots = list(self._snapshots.values()), {}
        if snaps:
            for line in stats_lines(self._view, snaps, self.cfg.server.stats_format):
                print(line)
            sys.stdout.flush()


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
