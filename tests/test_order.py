"""Reply order per connection (server.reply_order): pipelined requests whose
handlers finish out of order, on every backend.  The order of the bytes is
asserted, never timing; the `serve` fixture checks at teardown that every
pool buffer came back (parked replies included)."""

import random
import socket
import struct
import time

import pytest

from conftest import recv_line

APP = "tests.apps.behaviors:ordered"
LINE = ["--framing", "line", "--workers", "64"]
PRIO = ["--priority", "offset=0,value=0x48"]          # 'H' is level 0, the rest level 1


@pytest.fixture
def serve(serve_any):
    return serve_any


def replies(sock, n):
    return [recv_line(sock).rstrip(b"\n").decode() for _ in range(n)]


def assert_closed(sock):
    sock.settimeout(10)
    try:
        assert sock.recv(100) == b""
    except ConnectionResetError:
        pass


def test_pipelined_replies_in_arrival_order(serve):
    server = serve(APP, *LINE)
    rnd = random.Random(7)
    with server.connect() as s:
        for rounds in range(2):
            n = 30
            kinds = [rnd.choice("sse") for _ in range(n)]
            s.sendall(b"".join(b"%s %d %d\n" % (k.encode(), rnd.randint(0, 8), i)
                               for i, k in enumerate(kinds)))
            got = replies(s, n)
            # an echo (zero copy) returns its whole line: b"e MS TAG"
            assert [g.split()[-1] for g in got] == [str(i) for i in range(n)], got
            assert [g.startswith("e ") for g in got] == [k == "e" for k in kinds]


def test_completion_order_is_unordered(serve):
    server = serve(APP, *LINE, "--reply-order", "completion")
    n = 20
    with server.connect() as s:
        # earlier lines sleep longer: they finish last
        s.sendall(b"".join(b"s %d %d\n" % ((n - i) * 15, i) for i in range(n)))
        got = [int(x) for x in replies(s, n)]
    assert sorted(got) == list(range(n))
    assert got != list(range(n))
    assert got[0] != 0 and got[-1] != n - 1, got


def test_arrival_order_with_slow_first(serve):
    server = serve(APP, *LINE)
    n = 20
    with server.connect() as s:
        s.sendall(b"".join(b"s %d %d\n" % ((n - i) * 15, i) for i in range(n)))
        assert replies(s, n) == [str(i) for i in range(n)]


def test_mixed_priorities_stay_in_arrival_order(serve):
    server = serve(APP, *LINE, *PRIO)
    n = 24
    lines = [(b"H 1 %d\n" if i % 3 else b"s 40 %d\n") % i for i in range(n)]
    with server.connect() as s:
        s.sendall(b"".join(lines))
        assert replies(s, n) == [str(i) for i in range(n)]
        s.sendall(b"H 0 hi\n")                        # nothing left parked
        assert replies(s, 1) == ["hi"]


def test_no_reply_in_the_middle(serve):
    server = serve(APP, *LINE)
    with server.connect() as s:
        s.sendall(b"s 40 0\nn 1 1\ns 1 2\nn 60 3\ns 1 4\n")
        assert replies(s, 3) == ["0", "2", "4"]


def test_error_closes_after_earlier_replies(serve):
    server = serve(APP, *LINE)
    with server.connect() as s:
        s.sendall(b"s 60 0\ns 30 1\nb 1 2\ns 1 3\ns 80 4\n")
        assert replies(s, 2) == ["0", "1"]
        assert_closed(s)
    code = server.stop()
    assert code == 0
    assert server.stderr.count("handler raised") == 1
    assert "buffers in use 0" in server.stderr


def test_send_and_close_in_the_request_place(serve):
    server = serve(APP, *LINE)
    with server.connect() as s:
        s.sendall(b"s 50 0\np 1 1\ns 1 2\n")
        assert replies(s, 4) == ["0", "pre 1", "1", "2"]
        s.sendall(b"s 50 3\nc 1 4\ns 1 5\n")
        assert replies(s, 2) == ["3", "4"]
        assert_closed(s)


def test_reset_with_parked_replies_leaks_nothing(serve):
    server = serve(APP, *LINE)
    socks = [server.connect() for _ in range(5)]
    for s in socks:
        # the first reply is slow: the rest park behind it (copies and
        # zero-copy buffers), then the client resets the connection
        s.sendall(b"s 300 0\n" + b"".join(b"%s 1 %d\n" % (b"se"[i % 2:i % 2 + 1], i)
                                          for i in range(1, 40)))
    time.sleep(0.1)
    for s in socks:                                  # the five at once, not one by one
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    time.sleep(0.4)                                  # the slow replies find no conn
    with server.connect() as s:
        s.sendall(b"e 0 still-serving\n")
        assert replies(s, 1) == ["e 0 still-serving"]
    code = server.stop()
    assert code == 0
    assert "buffers in use 0" in server.stderr, server.stderr[-2000:]
