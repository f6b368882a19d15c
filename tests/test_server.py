"""The runtime end to end: `qstack serve`, real client sockets, one suite
run on every backend (kernel sockets on 127.0.0.1 under epoll and under
io_uring, and qstack's user-space TCP/IP stack on a TAP device, reached by
Linux's own TCP) and both stack layouts.

Every test's server must stop with exit 0 and all pool buffers returned
(checked by the `serve` fixture at teardown).
"""

import os
import select
import socket
import struct
import threading
import time

import gevent
import pytest
from gevent import socket as gsocket

from conftest import recv_exact, recv_line


@pytest.fixture
def serve(serve_any):
    """Every test here runs on every backend (kernel, uring, ustack, and
    dpdk where it is built), each with a stack thread and with the stack
    inline in the hub's thread."""
    return serve_any


def echo_ok(server, payload=b"still serving\n"):
    with server.connect() as s:
        s.sendall(payload)
        assert recv_exact(s, len(payload)) == payload


def test_thousand_connections_fifty_messages_each(serve):
    # 50 messages a connection: every length the pattern makes (j % 50)
    server = serve("apps.echo:handle", "--workers", "64")
    nconn, nmsg = 1000, 50
    errors = []

    def client(i):
        s = gsocket.create_connection(server.addr, timeout=60)
        try:
            for j in range(nmsg):
                msg = b"%06d:%03d:" % (i, j) + bytes([i % 251]) * (j % 50)
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = s.recv(65536)
                    if not chunk:
                        raise EOFError("closed")
                    got += chunk
                if got != msg:
                    errors.append((i, j, got[:40]))
                    return
        finally:
            s.close()

    jobs = []
    for i in range(nconn):
        jobs.append(gevent.spawn(client, i))
        if i % 100 == 99:
            gevent.sleep(0.01)          # stay under the accept backlog
    gevent.joinall(jobs, timeout=120, raise_error=True)
    assert all(j.dead for j in jobs)
    assert not errors, errors[:5]


def test_four_mib_message_intact(serve):
    server = serve("apps.echo:handle")
    payload = os.urandom(4 << 20)
    s = gsocket.create_connection(server.addr, timeout=60)
    sender = gevent.spawn(s.sendall, payload)
    got = bytearray()
    while len(got) < len(payload):
        chunk = s.recv(1 << 20)
        assert chunk, "server closed early"
        got += chunk
    sender.get(timeout=10)
    s.close()
    assert bytes(got) == payload
    echo_ok(server)


def test_four_mib_length_framed_message_intact(serve):
    server = serve("apps.echo:handle", "--framing", "length:4")
    payload = os.urandom(4 << 20)
    s = gsocket.create_connection(server.addr, timeout=60)
    sender = gevent.spawn(s.sendall, struct.pack(">I", len(payload)) + payload)
    head = recv_exact(s, 4)
    assert struct.unpack(">I", head)[0] == len(payload)
    assert recv_exact(s, len(payload)) == payload
    sender.get(timeout=10)
    s.close()


def test_line_framing_splits_and_joins(serve):
    server = serve("apps.echo:handle", "--framing", "line")
    with server.connect() as s:
        s.sendall(b"one\ntw")
        assert recv_line(s) == b"one\n"
        s.sendall(b"o\nthree\n")
        assert recv_line(s) == b"two\n"
        assert recv_line(s) == b"three\n"


def test_half_close_still_gets_replies(serve):
    server = serve("apps.echo:handle", "--framing", "line")
    with server.connect() as s:
        lines = b"".join(b"line %d\n" % i for i in range(100))
        s.sendall(lines)
        s.shutdown(socket.SHUT_WR)
        assert recv_exact(s, len(lines)) == lines
        assert s.recv(10) == b""            # the server closed its side after replying
    echo_ok(server)


def test_client_reset_mid_request(serve):
    server = serve("apps.echo:handle", "--framing", "length:4")
    for _ in range(20):
        s = server.connect()
        s.sendall(struct.pack(">I", 100000) + b"x" * 5000)   # a request cut short
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()                                             # RST
    with server.connect() as s:
        s.sendall(struct.pack(">I", 5) + b"hello")
        assert recv_exact(s, 9) == struct.pack(">I", 5) + b"hello"


def test_handler_error_closes_only_its_connection(serve):
    server = serve("tests.apps.behaviors:boom", "--framing", "line")
    with server.connect() as good, server.connect() as bad:
        good.sendall(b"before\n")
        assert recv_line(good) == b"before\n"
        bad.sendall(b"boom\n")
        assert bad.recv(10) == b""          # closed by the server
        good.sendall(b"after\n")
        assert recv_line(good) == b"after\n"
    code = server.stop()
    assert code == 0
    assert server.stderr.count("RuntimeError: boom requested by the test") == 1
    assert server.stderr.count("handler raised") == 1


def test_handler_returning_str_is_an_error_not_a_crash(serve):
    server = serve("tests.apps.behaviors:wrong_type")
    with server.connect() as s:
        s.sendall(b"x")
        assert s.recv(10) == b""
    code = server.stop()
    assert code == 0
    assert "non-bytes reply" in server.stderr


def wait_started(gate, n=1, timeout=10.0):
    """Wait until n handlers are holding at the gate (behaviors.hold())."""
    deadline = time.monotonic() + timeout
    while len(list(gate.parent.glob(gate.name + ".started.*"))) < n:
        assert time.monotonic() < deadline, f"fewer than {n} handlers started holding"
        time.sleep(0.005)


def test_blocked_handler_suspends_only_its_worker(serve, tmp_path):
    # the slow request holds its worker until the gate opens, which happens
    # only after the echoes: had they waited for it, they would time out
    gate = tmp_path / "gate"
    server = serve("tests.apps.behaviors:sleepy", "--workers", "4", "--framing", "line",
                   env={"QSTACK_TEST_GATE": str(gate)})
    with server.connect() as slow, server.connect() as fast:
        slow.sendall(b"hold\n")
        wait_started(gate)
        for i in range(50):
            fast.sendall(b"ping %d\n" % i)
            assert recv_line(fast) == b"ping %d\n" % i
        assert not select.select([slow], [], [], 0)[0], "the held request replied early"
        gate.touch()
        assert recv_line(slow) == b"held\n"


def test_cooperative_socket_in_handler(serve):
    # A local server that answers after 0.5 s: the handler waits on it through
    # a gevent socket while other requests on the same core are served.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    port = lsock.getsockname()[1]

    dialed, answer = threading.Event(), threading.Event()

    def slow_peer():
        c, _ = lsock.accept()
        c.recv(1)
        dialed.set()
        answer.wait(10)                 # answers only once the other was served
        c.sendall(b"late\n")
        c.close()

    t = threading.Thread(target=slow_peer, daemon=True)
    t.start()
    server = serve("tests.apps.behaviors:sleepy", "--workers", "4", "--framing", "line")
    with server.connect() as dialer, server.connect() as other:
        dialer.sendall(b"dial %d\n" % port)
        assert dialed.wait(10), "the handler did not dial"
        other.sendall(b"hello\n")
        assert recv_line(other) == b"hello\n"       # served while the dial waits
        assert not select.select([dialer], [], [], 0)[0]
        answer.set()
        assert recv_line(dialer) == b"late\n"
    t.join(5)
    lsock.close()


PRIO = ["--priority", "offset=0,value=0x48"]          # 'H' is level 0, the rest level 1


def _prio_run(server, tmp_path, workers, n_high, n_low):
    gate = tmp_path / "gate"
    holders = [server.connect() for _ in range(workers)]
    for h in holders:
        h.sendall(b"hold\n")
    # every worker level 1 may use is now busy (the default reserve keeps a
    # quarter for level 0: those holds wait queued)
    from qstack.coro.runqueue import default_reserve
    wait_started(gate, workers - default_reserve(workers, 2)[0])
    lows = [server.connect() for _ in range(n_low)]
    highs = [server.connect() for _ in range(n_high)]
    for s in lows:
        s.sendall(b"L\n")
    time.sleep(0.1)
    for s in highs:
        s.sendall(b"H\n")
    time.sleep(0.3)                                  # all of them queued natively
    gate.touch()
    for h in holders:
        assert recv_line(h) == b"held\n"
    seq = lambda s: tuple(int(x) for x in recv_line(s).split())
    high = [seq(s) for s in highs]
    low = [seq(s) for s in lows]
    for s in holders + lows + highs:
        s.close()
    assert all(p == 0 for _, p in high) and all(p == 1 for _, p in low)
    return [n for n, _ in high], [n for n, _ in low]


def test_queued_high_requests_all_served_before_queued_low(serve, tmp_path):
    server = serve("tests.apps.behaviors:seq", "--workers", "4", "--framing", "line",
                   *PRIO, env={"QSTACK_TEST_GATE": str(tmp_path / "gate")})
    high, low = _prio_run(server, tmp_path, workers=4, n_high=20, n_low=20)
    assert max(high) < min(low), (sorted(high), sorted(low))


def test_guaranteed_share_lets_low_progress(serve, tmp_path):
    conf = tmp_path / "share.yaml"
    conf.write_text("priority:\n  low_share: 0.5\n")
    server = serve("tests.apps.behaviors:seq", "--workers", "1", "--framing", "line",
                   "--config", str(conf), *PRIO,
                   env={"QSTACK_TEST_GATE": str(tmp_path / "gate")})
    high, low = _prio_run(server, tmp_path, workers=1, n_high=20, n_low=20)
    # with a 50% share, low requests interleave instead of all waiting
    assert min(low) < max(high), (sorted(high), sorted(low))
    assert sum(1 for n in low if n < max(high)) >= 8


def test_stream_handler_echo_and_close(serve):
    server = serve("tests.apps.behaviors:stream_echo")
    with server.connect() as a, server.connect() as b:
        for i in range(20):
            a.sendall(b"a%d" % i)
            b.sendall(b"b%d" % i)
            assert recv_exact(a, len(b"a%d" % i)) == b"a%d" % i
            assert recv_exact(b, len(b"b%d" % i)) == b"b%d" % i
        big = os.urandom(3 << 20)
        sender = threading.Thread(target=a.sendall, args=(big,))
        sender.start()
        assert recv_exact(a, len(big)) == big
        sender.join(10)
        a.shutdown(socket.SHUT_WR)
        assert a.recv(10) == b""


def test_stream_handler_closes(serve):
    server = serve("tests.apps.behaviors:stream_upper_then_close")
    with server.connect() as s:
        s.sendall(b"hello")
        assert recv_exact(s, 5) == b"HELLO"
        assert s.recv(10) == b""


def test_sigint_drains_in_flight_requests(serve, tmp_path):
    gate = tmp_path / "gate"
    server = serve("tests.apps.behaviors:sleepy", "--framing", "line",
                   env={"QSTACK_TEST_GATE": str(gate)})
    s = server.connect()
    s.sendall(b"hold\n")
    wait_started(gate)                         # the request is in its handler
    import signal
    server.proc.send_signal(signal.SIGINT)
    server.read_until("stderr", lambda err: "SIGINT: stopping" in err)
    # a server that did not wait for the request would be gone by now (its
    # accept linger is 0.02 s here)
    time.sleep(0.5)
    assert server.proc.poll() is None, "stopped with a request in flight"
    gate.touch()                               # it finishes only after the SIGINT
    assert recv_line(s) == b"held\n"           # the in-flight request finished
    s.close()
    assert server.proc.wait(10) == 0


def test_stream_handlers_many_connections(serve):
    server = serve("tests.apps.behaviors:stream_echo")
    errors = []

    def client(i):
        s = gsocket.create_connection(server.addr, timeout=60)
        try:
            for j in range(50):
                msg = b"%04d-%02d|" % (i, j) * (1 + j % 7)
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = s.recv(65536)
                    if not chunk:
                        raise EOFError
                    got += chunk
                if got != msg:
                    errors.append((i, j))
                    return
        finally:
            s.close()

    jobs = [gevent.spawn(client, i) for i in range(200)]
    gevent.joinall(jobs, timeout=60, raise_error=True)
    unfinished = sum(1 for j in jobs if not j.dead)
    assert not unfinished and not errors, (unfinished, errors[:5])


def test_stats_lines_report_traffic_per_level(serve):
    server = serve("apps.echo:handle", "--stats", "--stats-interval", "0.1", "--framing",
                   "line", *PRIO)
    with server.connect() as s:
        for i in range(200):
            s.sendall(b"H high\n" if i % 2 else b"low\n")
            recv_line(s)
    server.read_until("stdout", lambda out: any(ln.startswith("core 0")
                                                for ln in out.splitlines()))
    code = server.stop()
    assert code == 0
    lines = [ln for ln in server.stdout.splitlines() if ln.startswith("core 0")]
    assert lines, server.stdout
    assert "L0" in lines[0] and "L1" in lines[0] and "bufs" in lines[0]


@pytest.mark.parametrize("pin", ["none", "shared", "split"])
def test_threads_stay_in_the_cpu_set_started_with(serve, pin):
    """`taskset -c 0 qstack serve ...` keeps every thread on CPU 0, whatever
    the layout asks for."""
    if 0 not in os.sched_getaffinity(0):
        pytest.skip("CPU 0 is not available to this test")
    server = serve("apps.echo:handle", "--pin", pin, wrap=["taskset", "-c", "0"])
    echo_ok(server)
    tasks = f"/proc/{server.proc.pid}/task"
    allowed = set()
    for tid in os.listdir(tasks):
        with open(f"{tasks}/{tid}/status") as f:
            for line in f:
                if line.startswith("Cpus_allowed_list:"):
                    allowed.add(line.split()[1])
    assert allowed == {"0"}, allowed
