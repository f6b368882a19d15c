"""The uring backend as a user meets it: `--backend auto` (the default)
picks it where io_uring works and says otherwise; asked for by name it
serves; buffers lent to the kernel are not reported in use.  The server
and connection-layer suites run on it too (conftest.BACKENDS,
test_native.BACKENDS)."""

import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, recv_exact
from qstack.transport import ffi, lib, open_core, uring_refusal

refused = uring_refusal()
# Where io_uring works, the refusal paths run under a seccomp filter that
# refuses it to the server's process tree only (tests/no_io_uring.py).
NO_URING = () if refused else (sys.executable, os.path.join(ROOT, "tests", "no_io_uring.py"))
REFUSAL = refused or "the kernel refuses io_uring: EPERM (Operation not permitted)"


def stopped(server):
    code = server.stop()
    assert code == 0, server.stderr[-2000:]
    assert "buffers in use 0" in server.stderr, server.stderr[-2000:]
    return server.stderr


def echo(server, n=20):
    with server.connect() as s:
        for i in range(n):
            msg = b"message %d\n" % i
            s.sendall(msg)
            assert recv_exact(s, len(msg)) == msg


def test_auto_is_the_default_and_picks_uring_where_it_works(serve):
    server = serve("apps.echo:handle")
    echo(server)
    log = stopped(server)
    if refused:
        assert f"backend auto: kernel, not uring: {refused}" in log
        assert "(kernel backend," in log
    else:
        assert "(uring backend," in log
        assert "backend auto" not in log


@pytest.mark.parametrize("backend", ["uring", "kernel"])
@pytest.mark.parametrize("stack", ["thread", "inline"])
def test_named_backend_serves_and_says_so(serve, backend, stack):
    if backend == "uring" and refused:
        pytest.skip(refused)
    server = serve("apps.echo:handle", "--backend", backend, "--stack", stack, "--cores", "2")
    for _ in range(4):                 # SO_REUSEPORT spreads these over both cores
        echo(server, 5)
    log = stopped(server)
    assert log.count(f"({backend} backend,") == 2


def test_auto_falls_back_to_kernel_where_io_uring_is_refused(serve):
    """As in a container whose seccomp profile refuses io_uring: one warning
    (from the supervisor, not one per core), and every core serves on kernel."""
    server = serve("apps.echo:handle", "--cores", "2", wrap=NO_URING)
    for _ in range(4):
        echo(server, 5)
    log = stopped(server)
    assert log.count(f"backend auto: kernel, not uring: {REFUSAL}") == 1, log[-2000:]
    assert log.count("(kernel backend,") == 2 and "(uring backend," not in log, log[-2000:]


def one_error_line(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_uring_asked_for_and_refused_is_one_line_and_exit_2():
    proc = subprocess.run([*NO_URING, sys.executable, "-m", "qstack", "serve", "apps.echo:handle",
                           "--backend", "uring", "--port", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    one_error_line(proc, "server.backend: uring: " + REFUSAL, "--backend kernel (or auto)")


def test_load_on_uring_refused_is_one_line_and_exit_2(serve):
    """qstack load --backend uring where io_uring is refused: said before it
    connects anything, not as a failed run's report."""
    server = serve("apps.echo:handle", "--backend", "kernel")
    proc = subprocess.run([*NO_URING, sys.executable, "-m", "qstack", "load", "--backend", "uring",
                           "--dest", "%s:%d" % server.addr, "-c", "10", "-d", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    one_error_line(proc, "--backend uring: " + REFUSAL, "--backend kernel")


def test_probe_says_why_or_nothing():
    rc = lib.qs_uring_probe()
    assert (rc == 0) == (refused is None)


@pytest.mark.skipif(bool(refused), reason=refused or "")
def started_core(**options):
    """An inline uring core listening on a loopback port of its own, started;
    returns (core, address)."""
    core = open_core("uring", levels=1, buf_size=4096, inline=True, **options)
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(128)
    addr = ls.getsockname()
    core.listen(fd=ls.detach())
    core.start()
    return core, addr


def connect(core, addr, n):
    """n clients, stepping the core until it has accepted them all."""
    clients = [socket.create_connection(addr) for _ in range(n)]
    for _ in range(500):
        core.step(1)
        if core.stats().conns_open == n:
            break
    assert core.stats().conns_open == n
    return clients


def test_buffers_lent_to_the_kernel_are_not_in_use():
    """The provided-buffer ring holds pool buffers; idle, with connections
    open, the pool reports none in use, and a message held by the hub
    counts one."""
    core, addr = started_core(buf_count=256)
    try:
        assert core.stats().bufs_in_use == 0
        clients = connect(core, addr, 8)
        assert core.stats().bufs_in_use == 0
        clients[0].sendall(b"x" * 100)
        evs = ffi.new("qs_event[4]")
        got = 0
        for _ in range(200):
            core.step(1)
            got += core.poll(-1, evs, 4)
            if got:
                break
        assert got == 1 and evs[0].len == 100
        assert core.stats().bufs_in_use == 1      # the message's buffer, adopted
        for c in clients:
            c.close()
    finally:
        core.shutdown(0)
        core.release_local(evs[0].buf)
        assert core.stats().bufs_in_use == 0
        core.free()


def test_a_ring_far_smaller_than_the_connections_still_serves_them_all():
    """100 connections send at once into a provided-buffer ring of a few
    buffers: most receives find it empty and wait (starved); each refill
    re-arms only as many of them as the ring holds, in order, and stepping
    goes on while any wait -- every message arrives, every buffer comes
    back."""
    core, addr = started_core(buf_count=48, buf_reserve=8)
    evs, rel = ffi.new("qs_event[16]"), ffi.new("qs_cmd[16]")
    clients = []
    try:
        clients = connect(core, addr, 100)
        for i, c in enumerate(clients):
            c.sendall(b"%03d" % i)
        got = {}
        for _ in range(2000):
            core.step(1)
            n = core.poll(-1, evs, 16)
            for k in range(n):
                got[evs[k].conn] = got.get(evs[k].conn, 0) + evs[k].len
                rel[k].op, rel[k].level, rel[k].conn, rel[k].buf = \
                    lib.QS_CMD_RELEASE, evs[k].level, evs[k].conn, evs[k].buf
            assert core.submit(rel, n, ffi.NULL) == n     # the buffers back, as the hub does
            if sum(got.values()) == 300:
                break
        assert len(got) == 100 and sum(got.values()) == 300
        for _ in range(100):              # the last releases land in a step
            core.step(1)
            if core.stats().bufs_in_use == 0:
                break
        assert core.stats().bufs_in_use == 0
    finally:
        for c in clients:
            c.close()
        core.shutdown(0)
        core.free()
