"""``qstack redis up|down|status``: local redis-server instances on unix sockets.

    qstack redis up [N] [--dir DIR] [--debug]   # N servers, default 4
    qstack redis status [--dir DIR]
    qstack redis down [--dir DIR]

This replaces QStack's dir-redis.sh and setup-redis.sh for apps such as
iotepserver that talk to several Redis servers.  Server i listens on
``DIR/redis-i.sock`` only (``--port 0``: no TCP port), with its pid file and
log beside it, and persists nothing (no RDB snapshot, no AOF).  The defaults
(DIR ``/tmp/qstack-redis``, 4 servers) are those of conf/iotepserver.yaml,
so ``qstack redis up`` then ``qstack serve --config conf/iotepserver.yaml``
work together as they are.

The run directory is the whole state: ``status`` and ``down`` find the
servers through the files in it, from any shell, so nothing has to remember
what ``up`` started.

Why the checks.  redis-server unlinks whatever file sits at its socket path
before binding, so starting a second set over a running one would silently
steal its sockets: ``up`` leaves alone a server of its own that still runs
(a live redis-server in the pid file: reported, not restarted), refuses a
socket that accepts connections without one, and removes a stale one.  So
after one server died, ``up N`` starts just that one again; the healthy
ones keep their data and their clients.  A daemonized redis-server is not
our child, so stopping it means polling its pid; a zombie counts as gone
(some init processes never reap), and a pid that no longer belongs to a
redis-server is never signalled.  When one server of ``up`` fails, the ones
it started are stopped again, so a failed ``up`` leaves running only what
ran before.

Errors are ConfigErrors: one ``qstack: error:`` line and exit status 2.
This module uses only the standard library (PING is spoken by hand), so the
command works before anything else is installed.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time

from qstack.errors import ConfigError

__all__ = ["DEFAULT_DIR", "DEFAULT_COUNT", "add_redis_parser", "socket_path",
           "ping", "up", "down", "status"]

DEFAULT_DIR = "/tmp/qstack-redis"    # also app.settings.redis_dir in conf/iotepserver.yaml
DEFAULT_COUNT = 4                    # also app.settings.redis_count there
MAX_COUNT = 256
START_TIMEOUT = 5.0                  # seconds for a server to answer PING
STOP_TIMEOUT = 5.0                   # seconds after SIGTERM before SIGKILL
SUN_PATH_MAX = 107                   # sizeof(sockaddr_un.sun_path) - 1 on Linux

_INDEX = re.compile(r"redis-(\d+)\.(?:sock|pid)$")


def socket_path(directory: str, i: int) -> str:
    return os.path.join(directory, f"redis-{i}.sock")


def _pid_path(directory: str, i: int) -> str:
    return os.path.join(directory, f"redis-{i}.pid")


def _log_path(directory: str, i: int) -> str:
    return os.path.join(directory, f"redis-{i}.log")


# --- probing -----------------------------------------------------------------

def ping(path: str, timeout: float = 1.0) -> str | None:
    """None if a server answers PING on unix socket ``path``, else why not."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n") and len(reply) < 512:
                chunk = s.recv(512)
                if not chunk:
                    return "closed the connection without answering"
                reply += chunk
    except socket.timeout:
        return f"no answer within {timeout:g} s"
    except OSError as exc:
        return exc.strerror or str(exc)
    if reply.startswith(b"+PONG"):
        return None
    return "answered " + reply.decode(errors="replace").strip()   # e.g. -LOADING


def _accepts(path: str) -> bool:
    """True if something accepts connections on ``path`` (a live server)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(path)
        return True
    except OSError:
        return False


def _redis_pid(pid_file: str) -> int | None:
    """The pid in ``pid_file`` if it is a live (not zombie) redis-server."""
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (OSError, ValueError):
        return None
    # "pid (comm) state ...": comm may hold spaces or parentheses; split at the last ')'.
    comm = stat[stat.find("(") + 1:stat.rfind(")")]
    state = stat[stat.rfind(")") + 2:][:1]
    if not comm.startswith("redis-server") or state in ("Z", "X"):
        return None
    return pid


def _indices(directory: str) -> list[int]:
    """Server numbers that have a socket or pid file in ``directory``."""
    found = set()
    for path in glob.glob(os.path.join(glob.escape(directory), "redis-*.*")):
        m = _INDEX.search(os.path.basename(path))
        if m:
            found.add(int(m.group(1)))
    return sorted(found)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _log_tail(directory: str, i: int) -> str:
    try:
        with open(_log_path(directory, i), errors="replace") as f:
            line = _last_line(f.read()[-4096:])
    except OSError:
        return ""
    # Redis prefixes "pid:role date time level"; the message is what helps.
    return re.sub(r"^\d+:[A-Z] \d+ \w+ \d+ [\d:.]+ [.\-*#] ", "", line)


# --- up ------------------------------------------------------------------------

def up(count: int = DEFAULT_COUNT, directory: str = DEFAULT_DIR, debug: bool = False,
       out=print) -> int:
    """Make ``count`` redis-servers run in ``directory``: start the missing ones.

    Servers 0..count-1 that already run (a live redis-server in their pid
    file) are reported and left alone.  ConfigError on failure.
    """
    exe = shutil.which("redis-server")
    if exe is None:
        raise ConfigError("redis-server is not installed (apt-get install redis-server, "
                          "or put it on PATH)")
    if not 1 <= count <= MAX_COUNT:
        raise ConfigError(f"redis up: expected a number of servers in 1..{MAX_COUNT}, "
                          f"got {count}")
    directory = os.path.abspath(directory)
    longest = socket_path(directory, count - 1)
    if len(longest.encode()) > SUN_PATH_MAX:
        raise ConfigError(f"socket path {longest} is too long for a unix socket "
                          f"({len(longest.encode())} bytes, at most {SUN_PATH_MAX}): "
                          "choose a shorter --dir")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {directory}: {exc.strerror}") from None
    running = {i: pid for i in range(count)
               if (pid := _redis_pid(_pid_path(directory, i))) is not None}
    missing = [i for i in range(count) if i not in running]
    for i in missing:
        _claim(directory, i)
    try:
        for i in missing:
            _start(exe, directory, i, debug)
        for i in missing:
            _wait_ready(directory, i)
    except BaseException:
        # Every socket was free when claimed: whatever runs there now is ours.
        _stop_all(directory, missing)
        raise
    for i, pid in running.items():
        why = ping(socket_path(directory, i))
        out(f"redis-{i}.sock already running (pid {pid})"
            + (f", but it does not answer PING: {why}" if why else ""))
    if missing:
        names = ", ".join(f"redis-{i}.sock" for i in missing)
        out(f"started {len(missing)} redis-server(s) in {directory}: {names}"
            f"{' (DEBUG commands allowed)' if debug else ''}")
    else:
        out(f"all {count} redis-server(s) in {directory} were already running")
    return 0


def _claim(directory: str, i: int) -> None:
    """Make sure server i's socket path is free; remove a stale socket file."""
    path = socket_path(directory, i)
    pid = _redis_pid(_pid_path(directory, i))
    if pid is not None or (os.path.lexists(path) and _accepts(path)):
        who = f"redis-server pid {pid}" if pid is not None else "a running server"
        raise ConfigError(f"socket {path} is already taken by {who} "
                          f"(stop it with: qstack redis down --dir {directory})")
    if os.path.lexists(path):
        if not _is_socket(path):
            raise ConfigError(f"{path} exists and is not a socket; remove it or "
                              "choose another --dir")
        os.unlink(path)             # stale: its server died without cleaning up


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _start(exe: str, directory: str, i: int, debug: bool) -> None:
    for stale in (_pid_path(directory, i), _log_path(directory, i)):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    argv = [exe, "--port", "0",
            "--unixsocket", socket_path(directory, i), "--unixsocketperm", "700",
            "--daemonize", "yes", "--pidfile", _pid_path(directory, i),
            "--logfile", _log_path(directory, i),
            "--save", "", "--appendonly", "no", "--dir", directory]
    if debug:
        argv += ["--enable-debug-command", "local"]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", timeout=START_TIMEOUT,
                              cwd=directory)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"redis-server {i} failed to start: it did not daemonize "
                          f"within {START_TIMEOUT:g} s") from None
    except OSError as exc:
        raise ConfigError(f"redis-server {i} failed to start: {exc.strerror}") from None
    if done.returncode != 0:
        why = (_last_line(done.stderr) or _last_line(done.stdout) or
               _log_tail(directory, i) or f"exit status {done.returncode}")
        raise ConfigError(f"redis-server {i} failed to start: {why}")


def _wait_ready(directory: str, i: int) -> None:
    path = socket_path(directory, i)
    deadline = time.monotonic() + START_TIMEOUT
    why = "no socket yet"
    while time.monotonic() < deadline:
        if os.path.lexists(path):
            why = ping(path)
            if why is None:
                return
        if os.path.exists(_pid_path(directory, i)) and \
                _redis_pid(_pid_path(directory, i)) is None:
            break                   # it wrote its pid file, then died
        time.sleep(0.02)
    tail = _log_tail(directory, i)
    raise ConfigError(f"redis-server {i} failed to start: {tail or why} "
                      f"(log: {_log_path(directory, i)})")


# --- down ------------------------------------------------------------------------

def down(directory: str = DEFAULT_DIR, out=print) -> int:
    """Stop every redis-server whose pid file is in ``directory``."""
    directory = os.path.abspath(directory)
    stopped, failed = _stop_all(directory, _indices(directory))
    for i, pid, why in failed:
        out(f"redis-{i} (pid {pid}): {why}")
    if stopped or failed:
        out(f"stopped {len(stopped)} redis-server(s) in {directory}"
            + (f"; {len(failed)} could not be stopped" if failed else ""))
    else:
        out(f"no redis-server running in {directory}")
    return 1 if failed else 0


def _stop_all(directory: str, indices) -> tuple[list, list]:
    """SIGTERM every live server among ``indices``, wait, SIGKILL stragglers."""
    live = {}
    for i in indices:
        pid = _redis_pid(_pid_path(directory, i))
        if pid is not None:
            live[i] = pid
    failed = []
    for i, pid in list(live.items()):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        except OSError as exc:
            failed.append((i, pid, f"cannot signal: {exc.strerror}"))
            del live[i]
    _wait_gone(directory, live, STOP_TIMEOUT)
    for i, pid in live.items():
        if _redis_pid(_pid_path(directory, i)) == pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    _wait_gone(directory, live, 1.0)
    stopped = []
    for i, pid in live.items():
        if _redis_pid(_pid_path(directory, i)) == pid:
            failed.append((i, pid, "still running after SIGKILL"))
        else:
            stopped.append((i, pid))
    for i in indices:              # what a killed server could not clean up
        if _redis_pid(_pid_path(directory, i)) is None:
            for path in (_pid_path(directory, i), socket_path(directory, i)):
                try:
                    os.unlink(path)
                except OSError:
                    pass
    return stopped, failed


def _wait_gone(directory: str, live: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_redis_pid(_pid_path(directory, i)) != pid for i, pid in live.items()):
            return
        time.sleep(0.02)


# --- status ----------------------------------------------------------------------

def status(directory: str = DEFAULT_DIR, out=print) -> int:
    """One line per server: socket, pid, answers PING or not.  Exit 0 if all do."""
    directory = os.path.abspath(directory)
    indices = _indices(directory)
    if not indices:
        out(f"no redis-server in {directory} (start them with: "
            f"qstack redis up N --dir {directory})")
        return 1
    answering = 0
    for i in indices:
        path = socket_path(directory, i)
        pid = _redis_pid(_pid_path(directory, i))
        why = ping(path) if os.path.lexists(path) else "no socket"
        answering += why is None
        out(f"{path}  pid {pid if pid is not None else '-'}  "
            f"{'answers PING' if why is None else 'down: ' + why}")
    out(f"{answering} of {len(indices)} answer PING")
    return 0 if answering == len(indices) else 1


# --- the command line -------------------------------------------------------------

def add_redis_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``qstack redis`` (called by qstack.cli)."""
    p = sub.add_parser("redis", help="start, stop and check local redis-servers",
                       description="Local redis-server instances on unix sockets "
                                   "(DIR/redis-<i>.sock), for apps such as iotepserver.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    dir_help = f"run directory for sockets, pid files and logs (default {DEFAULT_DIR})"

    a = actions.add_parser("up", help="start N servers")
    a.add_argument("count", nargs="?", type=int, default=DEFAULT_COUNT, metavar="N",
                   help=f"number of servers (default {DEFAULT_COUNT})")
    a.add_argument("--dir", default=DEFAULT_DIR, help=dir_help)
    a.add_argument("--debug", action="store_true",
                   help="allow DEBUG commands over the sockets (e.g. DEBUG SLEEP "
                        "to slow a server down in tests)")
    a.set_defaults(run=lambda args: up(args.count, args.dir, args.debug))

    a = actions.add_parser("down", help="stop the servers in the run directory")
    a.add_argument("--dir", default=DEFAULT_DIR, help=dir_help)
    a.set_defaults(run=lambda args: down(args.dir))

    a = actions.add_parser("status", help="list the servers and whether they answer")
    a.add_argument("--dir", default=DEFAULT_DIR, help=dir_help)
    a.set_defaults(run=lambda args: status(args.dir))
