"""Listening on a Unix socket (server.host unix:PATH) and on several
addresses (--bind, repeatable; server.bind), kernel backend.  Real servers,
real sockets; every server a test starts is stopped by its fixture."""

import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, free_port, recv_line, wait_port


def wait_unix(path, proc, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}: "
                               f"{proc.stderr.read().decode(errors='replace')}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.05)
        finally:
            s.close()
    raise RuntimeError(f"server did not listen on {path} within {timeout}s")


class Run:
    """One `qstack serve` process; stop() sends SIGTERM and checks exit 0."""

    def __init__(self, *args):
        self.args = [sys.executable, "-m", "qstack", "serve", "apps.echo:handle",
                     "--framing", "line", *args]
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.stderr = ""
        self.early = b""                # stderr read while it runs (err_so_far)

    def err_so_far(self):
        """What the server has written to stderr so far (never blocks)."""
        fd = self.proc.stderr.fileno()
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self.early += chunk
        return self.early.decode(errors="replace")

    def stop(self, timeout=20.0):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise AssertionError("server did not stop in time")
        self.stderr = (self.early + err).decode(errors="replace")
        return self.proc.returncode


@pytest.fixture
def run():
    runs = []

    def start(*args):
        r = Run(*args)
        runs.append(r)
        return r

    def stop_all():
        while runs:
            r = runs.pop(0)
            running = r.proc.poll() is None
            code = r.stop()
            if running:
                assert code == 0, f"exit {code}: {r.stderr[-2000:]}"
                assert "buffers in use 0" in r.stderr, r.stderr[-2000:]

    start.stop_all = stop_all
    yield start
    stop_all()


def echo_unix(path, text=b"hello"):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(text + b"\n")
        return recv_line(s)


def echo_tcp(port, text=b"hello"):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(text + b"\n")
        return recv_line(s)


@pytest.fixture
def sock_path(tmp_path):
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    short = os.path.join("/tmp", f"qs-bind-{os.getpid()}-{time.monotonic_ns()}")
    os.mkdir(short)
    yield os.path.join(short, "s.sock")
    for name in os.listdir(short):
        os.unlink(os.path.join(short, name))
    os.rmdir(short)


@pytest.mark.parametrize("cores", [1, 2])
def test_echo_over_unix_socket(run, sock_path, cores):
    r = run("--host", "unix:" + sock_path, "--cores", str(cores))
    wait_unix(sock_path, r.proc)
    for i in range(20):
        assert echo_unix(sock_path, b"line %d" % i) == b"line %d\n" % i
    # several connections at once, so with 2 cores both may take some
    conns = []
    for i in range(8):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(sock_path)
        conns.append(s)
    for i, s in enumerate(conns):
        s.sendall(b"c%d\n" % i)
    for i, s in enumerate(conns):
        assert recv_line(s) == b"c%d\n" % i
        s.close()
    run.stop_all()
    assert r.proc.returncode == 0
    assert f"serving unix:{sock_path}" in r.stderr
    assert not os.path.exists(sock_path), "the socket file is removed at exit"


def test_stale_socket_file_is_removed(run, sock_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)           # bound, never listening: what a kill -9 leaves
    stale.close()
    assert os.path.exists(sock_path)
    r = run("--host", "unix:" + sock_path)
    wait_unix(sock_path, r.proc)
    assert echo_unix(sock_path) == b"hello\n"
    run.stop_all()
    assert not os.path.exists(sock_path)


def test_unix_socket_in_use_is_refused(run, sock_path):
    first = run("--host", "unix:" + sock_path)
    wait_unix(sock_path, first.proc)
    second = run("--host", "unix:" + sock_path)
    assert second.proc.wait(timeout=30) == 2
    err = second.proc.stderr.read().decode()
    assert "already in use" in err and "Traceback" not in err
    assert echo_unix(sock_path) == b"hello\n"   # the first still serves


@pytest.mark.parametrize("cores", [1, 2])
def test_two_tcp_binds_both_served(run, cores):
    p1, p2 = free_port(), free_port()
    r = run("--bind", f"127.0.0.1:{p1}", "--bind", f"127.0.0.1:{p2}", "--cores", str(cores))
    wait_port(p1, r.proc)
    wait_port(p2, r.proc)
    for i in range(10):
        assert echo_tcp(p1, b"a%d" % i) == b"a%d\n" % i
        assert echo_tcp(p2, b"b%d" % i) == b"b%d\n" % i
    run.stop_all()
    assert f"serving 127.0.0.1:{p1}, 127.0.0.1:{p2}" in r.stderr


@pytest.mark.parametrize("cores", [1, 2])
def test_unix_and_tcp_together(run, sock_path, cores):
    port = free_port()
    r = run("--bind", "unix:" + sock_path, "--bind", f"127.0.0.1:{port}",
            "--cores", str(cores))
    wait_unix(sock_path, r.proc)
    wait_port(port, r.proc)
    for i in range(10):
        assert echo_unix(sock_path, b"u%d" % i) == b"u%d\n" % i
        assert echo_tcp(port, b"t%d" % i) == b"t%d\n" % i
    run.stop_all()
    assert not os.path.exists(sock_path)


def test_bind_port_zero_is_resolved_once(run):
    """--bind HOST:0 picks one free port for every core, as --port 0 does."""
    r = run("--bind", "127.0.0.1:0", "--cores", "2")
    deadline = time.monotonic() + 15
    port = None
    line = b""
    while port is None and time.monotonic() < deadline:
        line = r.proc.stderr.readline()
        if not line:
            break
        if b"serving 127.0.0.1:" in line:
            port = int(line.split(b"serving 127.0.0.1:")[1].split()[0])
    assert port, line
    wait_port(port, r.proc)
    assert echo_tcp(port) == b"hello\n"


def test_reload_keeps_unix_and_tcp(run, sock_path):
    port = free_port()
    r = run("--bind", "unix:" + sock_path, "--bind", f"127.0.0.1:{port}", "--cores", "2")
    wait_unix(sock_path, r.proc)
    wait_port(port, r.proc)
    r.proc.send_signal(signal.SIGHUP)
    # both addresses answer through the reload and after it: until both old
    # cores have exited, then ten rounds more (bounded)
    deadline = time.monotonic() + 30
    after = 10
    while after:
        assert time.monotonic() < deadline, r.err_so_far()[-2000:]
        assert echo_unix(sock_path) == b"hello\n"
        assert echo_tcp(port) == b"hello\n"
        if r.err_so_far().count("old core ") >= 2:
            after -= 1
        time.sleep(0.02)
    run.stop_all()
    assert "SIGHUP: reloading" in r.stderr
    assert not os.path.exists(sock_path)


def _fails(*args):
    proc = subprocess.run([sys.executable, "-m", "qstack", "serve", "apps.echo:handle",
                           *args], cwd=ROOT, capture_output=True, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_bad_bind_value():
    assert "server.bind" in _fails("--bind", "nope")
    assert "server.bind" in _fails("--bind", "127.0.0.1:99999")
    assert "server.bind" in _fails("--bind", "unix:")


def test_unix_with_ustack_refused():
    err = _fails("--host", "unix:/tmp/x.sock", "--backend", "ustack", "--ip", "198.18.0.2/24")
    assert "server.host" in err and "Unix" in err
    err = _fails("--bind", "127.0.0.1:9000", "--backend", "ustack", "--ip", "198.18.0.2/24")
    assert "server.bind" in err


def test_unix_directory_missing():
    err = _fails("--host", "unix:/nonexistent-qstack-dir/s.sock")
    assert "does not exist" in err


def test_unix_peer_is_none(run, sock_path):
    """A Unix socket's client has no address: req.conn.peer is None, which
    the access log writes as '-' (and nothing fails on the way)."""
    r = run("--host", "unix:" + sock_path, "--access-log")
    wait_unix(sock_path, r.proc)
    assert echo_unix(sock_path) == b"hello\n"
    run.stop_all()
    assert "access - conn=" in r.stderr, r.stderr[-2000:]


def test_unix_path_too_long():
    err = _fails("--host", "unix:/tmp/" + "x" * 120 + ".sock")
    assert "at most 107 bytes" in err
