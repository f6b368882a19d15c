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

A child that exits with status 0 on its own has finished (someone stopped
it); only non-zero exits and deaths by signal are restarted.  A ConfigError
raised inside serve() before serving travels up the child's pipe so that the
user sees one ``qstack: error:`` line, not one per core, and nothing restarts.
"""

from __future__ import annotations

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
from qstack.stats import StatsView

log = logging.getLogger("qstack.supervisor")


@dataclass
class _Child:
    core: int
    pid: int
    fd: int                      # read end of the child's stats pipe
    started: float
    buf: bytes = b""
    fatal: str | None = None     # ConfigError message the child reported


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

    def __init__(self, cfg, handler, serve=None):
        """``serve`` defaults to qstack.server.serve; tests pass a fake."""
        self.cfg = cfg
        self.handler = handler
        self._serve = serve
        self._children: dict[int, _Child] = {}   # by pid
        self._cores = [_Core() for _ in range(cfg.server.cores)]
        self._signals: list[int] = []
        self._stopping = False
        self._deadline = 0.0
        self._code = 0
        self._error: str | None = None
        self._view = StatsView()
        self._snapshots: dict[int, dict] = {}     # newest per core since last print

    # --- public -------------------------------------------------------------

    def run(self) -> int:
        """Fork the cores and supervise them until stopped; return exit status."""
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        old_handlers = {s: signal.signal(s, self._on_signal)
                        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
        try:
            for core in range(len(self._cores)):
                self._spawn(core)
            code = self._loop()
        finally:
            self._kill_all()          # only does something if we are unwinding
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

    def _spawn(self, core: int) -> None:
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
        self._children[pid] = _Child(core, pid, r, time.monotonic())
        self._cores[core].restart_at = None
        log.debug("core %d started as pid %d", core, pid)

    def _child_main(self, core: int, stats_fd: int) -> None:
        code = 1
        try:
            # Undo the parent's signal plumbing; serve() installs its own.
            signal.set_wakeup_fd(-1)
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
                signal.signal(s, signal.SIG_DFL)
            self._sel.close()
            for fd in [self._wake_r, self._wake_w] + [c.fd for c in self._children.values()]:
                os.close(fd)
            serve = self._serve
            if serve is None:
                from qstack.server import serve
            code = serve(self.cfg, self.handler, core_index=core, stats_fd=stats_fd)
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
        elif "levels" in msg:
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
            if not self._stopping:
                for core, state in enumerate(self._cores):
                    if state.restart_at is not None and now >= state.restart_at:
                        self._spawn(core)
            if stats and self._snapshots and (
                    now >= last_print + patience or
                    all(c.core in self._snapshots for c in self._children.values())):
                last_print = now
                self._print_stats()
            if not self._children and all(c.restart_at is None for c in self._cores):
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
        if self._stopping:
            return signum == signal.SIGINT
        log.info("%s: stopping %d core(s)", signal.Signals(signum).name, len(self._children))
        self._stop(0)
        return False

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
        if self._stopping:
            log.debug("core %d (pid %d) %s", child.core, child.pid, what)
            return
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
        state.restart_at = now + delay
        self._view.forget(child.core)
        log.warning("core %d (pid %d) %s; restarting in %.1f s",
                    child.core, child.pid, what, delay)

    def _print_stats(self) -> None:
        snaps, self._snapshots = list(self._snapshots.values()), {}
        if snaps:
            for line in self._view.update(snaps):
                print(line)
            sys.stdout.flush()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
