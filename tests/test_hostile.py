"""Hostile peers against a real server (issue 10), on kernel sockets under
epoll (kernel) and io_uring (uring) and, where the attack applies, on the
user-space stack over TAP.

Each attack is held while a well-behaved probe (high priority where a rule
exists) keeps getting replies within a bound; the server's RSS stays under
a bound; the attackers are closed by a timeout with a warning saying so and
naming the last peer closed.  The attacks are bench/hostile.py's, smaller:
bounded in time and in connections (the attacker process holds one file
per connection, under the 20,000 open files a process may have), and run
in a process of their own.  Timeouts are shortened to 2 s so the closes come
within the test; the quotas are the defaults except a smaller pool where
that makes the attack bite sooner.  The user-space runs serve at
198.18.0.2 in a namespace of the test's own, as tests/test_server.py does.
"""

import os
import re
import socket
import sys
import time

import pytest

from conftest import ROOT, recv_exact, recv_line

sys.path.insert(0, os.path.join(ROOT, "bench"))
import hostile  # noqa: E402

PROBE_P99 = 0.25       # s: a stall is seconds (what these tests catch); the issue's
                       # 100 ms is shown by bench/hostile.py (p99 2-7 ms there), and
                       # one CI run of the whole suite saw 150 ms with nothing stalled
PROBE_MAX = 1.0


@pytest.fixture(autouse=True)
def short_accept_linger(monkeypatch):
    """hostile.run()'s servers stop as the serve fixture's do (conftest.py)."""
    monkeypatch.setenv("QSTACK_TEST_ACCEPT_LINGER", "0.02")


@pytest.fixture(params=["kernel", "uring", "ustack"])
def where(request):
    """hostile.run()'s backend and tap: a TAP device of an entered namespace
    for the user-space stack, None on kernel sockets."""
    yield from _where(request.param)


def _where(backend):
    if backend != "ustack":
        from qstack.transport import uring_refusal
        if backend == "uring" and uring_refusal():
            pytest.skip(uring_refusal())
        yield {"backend": backend, "tap": None}
        return
    from conftest import wait_tap
    from netns import entered_tap, why_not
    if why_not():
        pytest.skip(why_not())
    listening = hostile.wait_listening

    def wait_listening(proc, host, port, timeout=15.0):
        wait_tap(dev, proc)              # as the serve fixture does (conftest.py)
        listening(proc, host, port, timeout)

    with entered_tap() as dev, pytest.MonkeyPatch.context() as mp:
        mp.setattr(hostile, "wait_listening", wait_listening)
        yield {"backend": backend, "tap": dev}


def check_probe(r):
    p = r["probe"]
    assert p["n"] >= 20, r["stderr"][-2000:]
    assert p["failures"] == 0, p
    assert p["p99"] < PROBE_P99, p
    assert p["max"] < PROBE_MAX, p


def check_exit(r, where):
    assert r["exit"] == 0, r["stderr"][-2000:]
    assert f"({where['backend']} backend," in r["stderr"], r["stderr"][-2000:]
    assert "buffers in use 0" in r["stderr"], r["stderr"][-2000:]
    if where["tap"] is not None:
        assert "packet buffers in use 0" in r["stderr"], r["stderr"][-2000:]


def last_peer_named(r, what, tap):
    """A warning about `what` names an address of the attacker's host."""
    host = "127.0.0.1" if tap is None else "198.18.0.1"
    pat = re.compile(re.escape(what) + r" \(\d+ since the core started; the last from " +
                     re.escape(host) + r":\d+\)")
    return any(pat.search(s) for s in r["said"])


@pytest.fixture(params=[("kernel", "thread"), ("uring", "inline"), ("ustack", "thread"),
                        ("ustack", "inline")], ids="-".join)
def where_stack(request):
    """Each backend and each stack layout at least once (not every pair:
    each run holds the attack for seconds)."""
    backend, stack = request.param
    for where in _where(backend):
        yield {**where, "stack": stack}


def test_slowloris_one_byte_each_does_not_take_the_pool(where_stack):
    # 3,000 conns each holding 1 byte of a 200-byte message, against a pool of
    # 1,024 buffers: before, the first 1,024 took the whole pool.
    tap = where_stack["tap"]
    r = hostile.run("slowloris", 3000, hold=4.0, buf_count=1024, mt=2.0, **where_stack)
    check_exit(r, where_stack)
    check_probe(r)
    # held (not refused) while partial: far more than the pool (the first
    # ones may be reset already if opening 3,000 took the 2 s timeout)
    assert r["held_up"] > 2000
    assert r["held_at_end"] == 0                  # then reset by the message timeout
    assert last_peer_named(r, "message timeouts", tap), r["stderr"][-2000:]
    assert r["rss_peak"] - r["rss_base"] < 64 << 20, r


def test_never_reading_clients_do_not_hold_the_pool(where):
    # 50 peers with a 4 KiB receive buffer sending 1 KiB lines, never reading.
    # Before: replies queued after the socket filled kept their pool buffers
    # (1,024 of 1,024) and the probe waited 2 s, every time.
    tap = where["tap"]
    r = hostile.run("nonreaders", 50, hold=5.0, buf_count=1024, wt=2.0, **where)
    check_exit(r, where)
    check_probe(r)
    # reset by the write timeout (a peek on the client cannot tell: the
    # unread replies are still in its receive buffer)
    assert last_peer_named(r, "write timeouts", tap), r["stderr"][-2000:]
    assert "50 write timeouts" in r["stderr"], r["stderr"][-2000:]
    # per conn out_high_water (4 MiB) at most, and 64 MiB of copies for all
    assert r["rss_peak"] - r["rss_base"] < 200 << 20, r


def test_large_partial_messages_are_capped(where):
    # 20 peers announcing 15 MiB and sending 14 MiB, under a 64 MiB cap:
    # 4 fit, the others wait (not read: TCP pushes back).
    tap = where["tap"]
    r = hostile.run("large", 20, hold=5.0, max_large=64 << 20, mt=3.0, **where)
    check_exit(r, where)
    check_probe(r)
    assert r["rss_peak"] - r["rss_base"] < (64 + 64) << 20, r
    assert (last_peer_named(r, "message timeouts", tap) or
            last_peer_named(r, "quota closes", tap)), r["stderr"][-2000:]


def test_a_message_that_can_never_fit_the_cap_is_refused(serve, tmp_path):
    cfg = tmp_path / "q.yaml"
    cfg.write_text("native:\n  max_large_bytes: 1048576\n")
    server = serve("apps.echo:handle", "--framing", "length:4", "--config", str(cfg))
    with server.connect() as s:
        port = s.getsockname()[1]
        s.sendall((4 << 20).to_bytes(4, "big") + b"x" * 65536)
        s.settimeout(5)
        with pytest.raises((ConnectionResetError, EOFError)):
            while s.recv(1 << 16):
                pass
            raise EOFError
    with server.connect() as s:       # and the others are served
        s.sendall(b"\x00\x00\x00\x02hi")
        assert recv_exact(s, 6) == b"\x00\x00\x00\x02hi"
    server.stop()
    assert "1 quota closes" in server.stderr, server.stderr[-2000:]
    assert (f"1 new quota closes (1 since the core started; the last from 127.0.0.1:{port})"
            in server.stderr), server.stderr[-2000:]


def test_idle_timeout_closes_idle_connections(serve):
    server = serve("apps.echo:handle", "--framing", "line", "--idle-timeout", "1")
    with server.connect() as s:
        port = s.getsockname()[1]
        s.sendall(b"hi\n")
        assert recv_line(s) == b"hi\n"
        s.settimeout(5)
        t0 = time.monotonic()
        assert s.recv(10) == b""                  # closed, gracefully
        assert 0.9 < time.monotonic() - t0 < 3.5
    server.stop()
    assert "1 idle timeouts" in server.stderr, server.stderr[-2000:]
    assert f"the last from 127.0.0.1:{port})" in server.stderr, server.stderr[-2000:]


def test_a_protocol_error_is_said_with_the_peer(serve):
    # Before: an oversized frame reset the connection and nothing said who.
    server = serve("apps.echo:handle", "--framing", "line", "--max-message", "64")
    with server.connect() as s:
        port = s.getsockname()[1]
        s.sendall(b"x" * 200)
        s.settimeout(5)
        with pytest.raises((ConnectionResetError, EOFError)):
            while s.recv(1 << 16):
                pass
            raise EOFError
    with server.connect() as s:
        s.sendall(b"ok\n")
        assert recv_line(s) == b"ok\n"
    server.stop()
    assert (f"1 new protocol errors (1 since the core started; the last from "
            f"127.0.0.1:{port})" in server.stderr), server.stderr[-2000:]


def test_handlers_see_the_peer_address(serve_any):
    # req.conn.peer is what the client's getsockname() says, on every backend
    server = serve_any("tests.apps.behaviors:peer", "--framing", "line")
    conns = [server.connect() for _ in range(3)]
    try:
        for s in conns + conns[::-1]:
            host, port = s.getsockname()
            s.sendall(b"who\n")
            assert recv_line(s) == f"{host} {port}\n".encode()
    finally:
        for s in conns:
            s.close()


def test_stream_handlers_see_the_peer_address(serve):
    server = serve("tests.apps.behaviors:stream_peer")
    with server.connect() as s:
        host, port = s.getsockname()
        s.sendall(b"x")
        assert recv_line(s) == f"{host} {port}\n".encode()


@pytest.mark.parametrize("size", [100, 100000])
def test_kept_slice_of_req_data_keeps_its_bytes(serve, size):
    # A slice of req.data kept past the request used to show whatever the
    # pool buffer held next (or freed memory, for a large message).
    server = serve("tests.apps.keep:handle", "--framing", "length:4")
    frame = lambda b: len(b).to_bytes(4, "big") + b                      # noqa: E731
    body = b"k" + bytes(range(256)) * (size // 256) + b"end"
    with server.connect() as s:
        s.sendall(frame(body))
        assert recv_exact(s, 7)[4:] == b"ok\n"
        for i in range(300):                      # reuse every buffer many times
            junk = b"j" + bytes([i % 256]) * (size + 3)   # not a k/d command
            s.sendall(frame(junk))
            assert recv_exact(s, 4 + len(junk))[4:] == junk
        s.sendall(frame(b"d"))
        n = int.from_bytes(recv_exact(s, 4), "big")
        assert recv_exact(s, n) == body[1:] + b"\n"
    # the kept buffer went back once the slice died: the fixture checks
    # "buffers in use 0" at exit


def test_kept_memoryview_export_keeps_its_bytes(serve):
    server = serve("tests.apps.keep:handle", "--framing", "line")
    with server.connect() as s:
        s.sendall(b"kabc\n")
        assert recv_line(s) == b"ok\n"
        for i in range(200):
            s.sendall(b"%05d\n" % i)
            assert recv_line(s) == b"%05d\n" % i
        s.sendall(b"d\n")
        assert recv_line(s) == b"abc\n"
