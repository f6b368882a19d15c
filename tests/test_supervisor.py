"""The supervisor of ``--cores N``: real forks, real signals, bounded waits.

Two groups:

* A fake ``serve`` (injected through Supervisor(serve=...)) checks the
  supervisor's own logic -- restart with backoff, giving up, shutdown, the
  second SIGINT, a ConfigError inside a child, stats -- without the server.
* Tests marked ``needs_server`` run ``qstack serve tests.apps.pidecho:handle
  --cores 2`` for real; they are skipped until the native core is built.
"""

import importlib.util
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_server = pytest.mark.skipif(
    importlib.util.find_spec("qstack._native") is None,
    reason="needs the native core (qstack._native) to serve")

# Runs a Supervisor whose children run `serve` below instead of the server.
# argv: mode cores grace.  Each child prints "child <core> <pid>" first.
FAKE = r"""
import json, logging, os, signal, sys, time
from qstack.config import load_config
from qstack.errors import ConfigError
from qstack.supervisor import Supervisor

mode, cores, grace = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
logging.basicConfig(level=logging.INFO, format="%(message)s")
cfg = load_config(None, {"server.cores": cores, "server.shutdown_grace": grace,
                         "server.stats": True, "server.stats_interval": 0.2})

def serve(cfg, handler, core_index=0, stats_fd=None):
    os.write(1, f"child {core_index} {os.getpid()}\n".encode())  # one write: atomic
    if mode == "crash":
        return 1
    if mode == "fatal":
        raise ConfigError("cannot create the native core: boom")
    if mode == "exit0":
        return 0
    stop = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *a: stop.append(1))
    n = 0
    while not stop:
        n += 100
        lat = [0] * 328
        lat[100] = n
        snap = {"core": core_index, "t": time.monotonic(), "conns": 3, "accepted": 3,
                "bufs_in_use": 1, "bufs_total": 64, "cpu_stack": 0.0,
                "cpu_hub": 0.0, "levels": [{"requests": n, "bytes_in": n,
                "bytes_out": n, "replies": n, "queued": 0, "lat": lat}]}
        os.write(stats_fd, (json.dumps(snap) + "\n").encode())
        time.sleep(0.1)
    if mode == "slowstop":
        time.sleep(60)
    return 0

try:
    sys.exit(Supervisor(cfg, None, serve=serve).run())
except ConfigError as e:
    print(f"qstack: error: {e}", file=sys.stderr)
    sys.exit(2)
"""


class Proc:
    """A child process whose stdout lines are collected in the background."""

    def __init__(self, argv, cwd=ROOT):
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        self.seen = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, pred, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(line)
            if pred(line):
                return line
        pytest.fail(f"no matching line within {timeout}s; saw {self.seen[-20:]}")

    def children(self, n, timeout=10):
        """Wait for n 'child <core> <pid>' lines: [(core, pid), ...]."""
        out = []
        while len(out) < n:
            line = self.wait_line(lambda ln: ln.startswith("child "), timeout)
            _, core, pid = line.split()
            out.append((int(core), int(pid)))
        return out

    def finish(self, timeout):
        t0 = time.monotonic()
        try:
            self.p.wait(timeout=timeout)
        finally:
            self.p.kill()
        err = self.p.stderr.read()
        return self.p.returncode, err, time.monotonic() - t0

    def kill(self):
        self.p.kill()
        self.p.wait(timeout=10)


def fake(mode, cores=2, grace=1.0):
    return Proc([sys.executable, "-c", FAKE, mode, str(cores), str(grace)])


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def parent_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def wait_dead(pids, timeout=5):
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


# --- supervisor logic, fake serve ----------------------------------------------

def test_restarts_a_killed_child_and_stops_on_sigterm():
    sup = fake("run")
    try:
        first = dict(sup.children(2))
        assert sorted(first) == [0, 1]
        assert all(parent_of(pid) == sup.p.pid for pid in first.values())
        os.kill(first[1], signal.SIGKILL)
        (core, pid), = sup.children(1, timeout=5)
        assert core == 1 and pid != first[1] and alive(first[0])
        sup.p.send_signal(signal.SIGTERM)
        rc, err, took = sup.finish(timeout=1.0 + 2 + 3)
    finally:
        sup.kill()
    assert rc == 0, err
    assert f"core 1 (pid {first[1]}) was killed by SIGKILL; restarting in 0.1 s" in err
    assert "Traceback" not in err
    assert not wait_dead([first[0], pid])


def test_prints_stats_lines_with_a_total():
    sup = fake("run")
    try:
        sup.wait_line(lambda ln: ln.startswith("total "), timeout=10)
        lines = sup.seen
        assert any(ln.startswith("core 0 ") for ln in lines)
        assert any(ln.startswith("core 1 ") for ln in lines)
        total = sup.wait_line(lambda ln: ln.startswith("total "), timeout=5)
        assert "conns 6" in total and "req/s" in total and "bufs 2/128" in total
        sup.p.send_signal(signal.SIGTERM)
        rc, err, _ = sup.finish(timeout=6)
    finally:
        sup.kill()
    assert rc == 0, err


def test_gives_up_after_5_quick_failures():
    sup = fake("crash", cores=2)
    try:
        rc, err, took = sup.finish(timeout=15)
    finally:
        sup.kill()
    assert rc == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("qstack: error:")]
    assert len(errors) == 1, err
    assert "failed 5 times within 10 s" in errors[0] and "giving up" in errors[0]
    assert "exited with status 1; restarting in 0.1 s" in err
    assert "restarting in 0.8 s" in err
    assert "Traceback" not in err


def test_config_error_in_a_child_is_one_line_and_no_restart():
    sup = fake("fatal", cores=2)
    try:
        rc, err, _ = sup.finish(timeout=10)
    finally:
        sup.kill()
    assert rc == 2
    assert err.splitlines() == ["qstack: error: cannot create the native core: boom"]


def test_children_that_exit_0_are_not_restarted():
    sup = fake("exit0", cores=2)
    try:
        sup.children(2)
        rc, err, _ = sup.finish(timeout=10)
    finally:
        sup.kill()
    assert rc == 0 and "restarting in" not in err and "with status 0; not restarting" in err


def test_kills_children_that_outlive_the_grace_period():
    sup = fake("slowstop", cores=2, grace=0.5)
    try:
        pids = [pid for _, pid in sup.children(2)]
        time.sleep(0.3)
        sup.p.send_signal(signal.SIGTERM)
        rc, err, took = sup.finish(timeout=0.5 + 2 + 5)
    finally:
        sup.kill()
    assert rc == 0, err
    assert 2.0 <= took < 0.5 + 2 + 2
    assert "killing 2 core(s)" in err
    assert not wait_dead(pids)


def test_second_sigint_kills_at_once():
    sup = fake("slowstop", cores=2, grace=30)
    try:
        pids = [pid for _, pid in sup.children(2)]
        sup.p.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert sup.p.poll() is None, "the first SIGINT must wait for the children"
        sup.p.send_signal(signal.SIGINT)
        rc, err, took = sup.finish(timeout=5)
    finally:
        sup.kill()
    assert rc == 1 and took < 3, err
    assert not wait_dead(pids)


# --- the real server -----------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask_pid(sock):
    sock.sendall(b"pid?")
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(64)
        assert chunk, "connection closed"
        data += chunk
    return int(data.split()[-1])


def pids_by_connecting(port, want, timeout=20, sup=None):
    """Connect afresh until the pids seen satisfy ``want(pids)``."""
    seen = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sup is not None and sup.p.poll() is not None:
            pytest.fail(f"the supervisor exited with {sup.p.returncode}: "
                        f"{sup.p.stderr.read()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                seen.add(ask_pid(s))
        except OSError:
            time.sleep(0.05)
            continue
        if want(seen):
            return seen
    pytest.fail(f"only saw pids {seen} within {timeout}s")


@needs_server
def test_two_cores_serve_restart_and_stop():
    port = free_port()
    sup = Proc([sys.executable, "-m", "qstack", "serve", "tests.apps.pidecho:handle",
                "--cores", "2", "--port", str(port), "--grace", "2"])
    try:
        pids = pids_by_connecting(port, lambda s: len(s) >= 2, sup=sup)
        assert len(pids) == 2
        assert all(parent_of(p) == sup.p.pid for p in pids)

        keep = socket.create_connection(("127.0.0.1", port), timeout=5)
        survivor = ask_pid(keep)
        victim, = pids - {survivor}
        os.kill(victim, signal.SIGKILL)
        # The established connection on the other core keeps working while
        # the supervisor restarts the killed one.
        deadline = time.monotonic() + 20
        new = set()
        while not new and time.monotonic() < deadline:
            assert ask_pid(keep) == survivor
            new = pids_by_connecting(port, lambda s: bool(s - pids), timeout=20, sup=sup) - pids
        assert new and all(parent_of(p) == sup.p.pid for p in new)
        assert ask_pid(keep) == survivor
        keep.close()

        sup.p.send_signal(signal.SIGTERM)
        rc, err, took = sup.finish(timeout=2 + 2 + 3)
    finally:
        sup.kill()
    assert rc == 0, err
    assert f"pid {victim}" in err and "SIGKILL" in err
    assert "Traceback" not in err
    assert not wait_dead(list(pids | new))


# --- lifecycle: supervisor death, reload, grace overrun ---------------------------

def port_is_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))      # no SO_REUSEPORT: any holder blocks it
        except OSError:
            return False
    return True


@needs_server
def test_kill_9_of_the_supervisor_takes_the_cores_and_frees_the_port():
    port = free_port()
    sup = Proc([sys.executable, "-m", "qstack", "serve", "tests.apps.pidecho:handle",
                "--cores", "2", "--port", str(port), "--grace", "1"])
    try:
        pids = pids_by_connecting(port, lambda s: len(s) >= 2, sup=sup)
        os.kill(sup.p.pid, signal.SIGKILL)
        sup.p.wait(timeout=5)
        # PR_SET_PDEATHSIG sends SIGTERM: a graceful stop within the grace period.
        assert not wait_dead(list(pids), timeout=1 + 4), "cores outlived the supervisor"
        assert port_is_free(port)
        # and the next start on the same port works
        again = Proc([sys.executable, "-m", "qstack", "serve", "tests.apps.pidecho:handle",
                      "--cores", "2", "--port", str(port), "--grace", "1"])
        try:
            assert pids_by_connecting(port, lambda s: len(s) >= 1, sup=again)
            again.p.send_signal(signal.SIGTERM)
            rc, err, _ = again.finish(timeout=1 + 2 + 3)
            assert rc == 0, err
        finally:
            again.kill()
    finally:
        sup.kill()
        for pid in pids_alive_children(sup.p.pid):
            os.kill(pid, signal.SIGKILL)


def pids_alive_children(parent):
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if parent_of(int(name)) == parent:
                    out.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return out


RELOAD_APP = '''
import os
VERSION = b"%s"
def handle(req):
    return VERSION + b" %%d\\n" %% os.getpid()
'''


class Client(threading.Thread):
    """Sends continuously, one connection per request (as HTTP/1.0 clients do),
    and records every reply and every failure."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.replies = []
        self.failures = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(b"q")
                    data = b""
                    while not data.endswith(b"\n"):
                        chunk = s.recv(64)
                        if not chunk:
                            raise ConnectionError(f"closed after {data!r}")
                        data += chunk
                self.replies.append(data.split())
            except OSError as e:
                self.failures.append(repr(e))
            time.sleep(0.002)


@needs_server
def test_sighup_reloads_the_handler_without_losing_a_request(tmp_path):
    port = free_port()
    app = tmp_path / "reloadapp.py"
    app.write_text(RELOAD_APP % "one")
    sup = Proc([sys.executable, "-m", "qstack", "serve", "reloadapp:handle", "--cores", "2",
                "--port", str(port), "--grace", "2"], cwd=str(tmp_path))
    client = Client(port)
    try:
        old = pids_by_connecting(port, lambda s: len(s) >= 1, sup=sup)
        client.start()
        deadline = time.monotonic() + 20
        while len(client.replies) < 50:   # the old version serves a while
            assert time.monotonic() < deadline, client.failures[:5]
            time.sleep(0.01)
        app.write_text(RELOAD_APP % "two-the-new-one")  # new size: no stale .pyc
        sup.p.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if client.replies and client.replies[-1][0] == b"two-the-new-one":
                break
            time.sleep(0.05)
        # and keep sending while the old cores stop: until they are gone and
        # 200 replies have come after the first new one (bounded)
        first = len(client.replies)
        deadline = time.monotonic() + 20
        while (any(alive(int(p)) for p in old) or len(client.replies) < first + 200) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        client.stop.set()
        client.join(timeout=10)
        assert not client.failures, client.failures[:5]
        versions = [r[0] for r in client.replies]
        assert versions[0] == b"one" and versions[-1] == b"two-the-new-one"
        first_new = versions.index(b"two-the-new-one")
        assert b"one" not in versions[first_new + 50:], "old cores kept accepting"
        new_pids = {int(r[1]) for r in client.replies if r[0] == b"two-the-new-one"}
        assert not new_pids & {int(p) for p in old}
        assert not wait_dead([int(p) for p in old], timeout=2 + 3)
        assert all(parent_of(p) == sup.p.pid for p in new_pids)
        sup.p.send_signal(signal.SIGTERM)
        rc, err, _ = sup.finish(timeout=2 + 2 + 3)
    finally:
        client.stop.set()
        sup.kill()
    assert rc == 0, err
    assert "SIGHUP: reloading: starting 2 new core(s)" in err
    assert "reload: generation 1 serves" in err
    assert "Traceback" not in err


@needs_server
def test_sighup_with_a_broken_handler_keeps_the_old_cores(tmp_path):
    port = free_port()
    app = tmp_path / "reloadapp.py"
    app.write_text(RELOAD_APP % "one")
    sup = Proc([sys.executable, "-m", "qstack", "serve", "reloadapp:handle", "--cores", "2",
                "--port", str(port), "--grace", "1"], cwd=str(tmp_path))
    try:
        old = pids_by_connecting(port, lambda s: len(s) >= 2, sup=sup)
        app.write_text("this is not python\n")
        sup.p.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert pids_by_connecting(port, lambda s: len(s) >= 2, sup=sup) == old
        sup.p.send_signal(signal.SIGTERM)
        rc, err, _ = sup.finish(timeout=1 + 2 + 3)
    finally:
        sup.kill()
    assert rc == 0, err
    assert "SIGHUP: reload failed, the running cores keep serving: cannot import handler" \
        in err


@needs_server
def test_grace_overrun_on_several_cores_exits_3_with_the_count():
    port = free_port()
    sup = Proc([sys.executable, "-m", "qstack", "serve", "tests.apps.pidecho:handle",
                "--cores", "2", "--port", str(port), "--grace", "0.5"])
    try:
        pids_by_connecting(port, lambda s: len(s) >= 1, sup=sup)
        conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        for c in conns:
            c.sendall(b"sleep")            # each lasts 30 s
        time.sleep(0.5)
        sup.p.send_signal(signal.SIGTERM)
        rc, err, took = sup.finish(timeout=0.5 + 2 + 5)
        for c in conns:
            c.close()
    finally:
        sup.kill()
    assert rc == 3, err
    assert "grace period ran out: 2 request(s) dropped; exit status 3" in err
    assert "Traceback" not in err
