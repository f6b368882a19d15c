"""Priority end to end while handlers block downstream (issue 9).

64 low-priority requests wait on a slow local TCP server (the downstream),
holding every worker they may take; then a high-priority request arrives.
It must be answered before every low request that arrived before it: it
gets one of the workers held back for level 0 (priority.reserve), and when
the downstream answers everybody in the same instant its worker resumes
first (priority-ordered wake-ups).  Order is asserted, never time: the
server counts its replies, and the high request's number must be below
every low one's.

"The same instant" is made exact: the server process is stopped (SIGSTOP)
while the downstream writes all of its answers, then continued, so one
epoll_wait sees them all, as a burst of Redis replies would be seen.
"""

import os
import signal
import socket
import threading
import time

import pytest

from conftest import recv_line

PRIO = ["--priority", "offset=0,value=0x48", "--framing", "line"]   # 'H' is level 0


class Downstream:
    """A TCP server that holds every query until release(), then answers
    each held one and every later one at once."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.held = []
        self.lock = threading.Lock()
        self.open = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.recv(64)
            with self.lock:
                if not self.open:
                    self.held.append(conn)
                    continue
            self._answer(conn)

    @staticmethod
    def _answer(conn):
        try:
            conn.sendall(b"ok\n")
        except OSError:
            pass
        conn.close()

    def count(self):
        with self.lock:
            return len(self.held)

    def wait_for(self, n, timeout=10.0):
        deadline = time.monotonic() + timeout
        while self.count() < n:
            assert time.monotonic() < deadline, f"downstream got {self.count()} of {n} queries"
            time.sleep(0.01)
        time.sleep(0.1)                 # and no more than that
        return self.count()

    def release(self):
        with self.lock:
            self.open = True
            held, self.held = self.held, []
        for conn in held:
            self._answer(conn)

    def close(self):
        self.release()
        self.sock.close()


def stop(pid, timeout=10.0):
    """SIGSTOP, and wait until every thread of the process has stopped (the
    signal is delivered asynchronously)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(st in "tT" for st in states):
            return
        assert time.monotonic() < deadline, f"process {pid} did not stop: {states}"
        time.sleep(0.005)


@pytest.fixture
def downstream():
    d = Downstream()
    yield d
    d.close()


def send(server, line, n=1):
    """n connections to server, each sending line; returns them."""
    conns = []
    for _ in range(n):
        s = server.connect()
        s.sendall(line)
        conns.append(s)
    return conns


@pytest.mark.parametrize("stack", ["inline", "thread"])
def test_high_request_answered_before_blocked_lows(serve, downstream, stack):
    server = serve("tests.apps.behaviors:dial_order", "--workers", "64", "--stack", stack,
                   *PRIO, env={"QSTACK_TEST_DIAL": str(downstream.port)})
    lows = send(server, b"L\n", 64)
    # the default reserve holds 16 of 64 workers back for level 0
    assert downstream.wait_for(48) == 48
    high, = send(server, b"H\n")
    assert downstream.wait_for(49) == 49
    stop(server.proc.pid)
    try:
        downstream.release()            # lows' answers first, then the high one
        time.sleep(0.3)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    order = lambda s: tuple(int(x) for x in recv_line(s).split())
    n_high, level = order(high)
    assert level == 0
    low = [order(s) for s in lows]
    assert all(lv == 1 for _, lv in low)
    assert all(n_high < n for n, _ in low), (n_high, sorted(n for n, _ in low)[:5])
    for s in lows + [high]:
        s.close()


def test_without_reserve_the_high_request_waits_for_a_worker(serve, downstream):
    """The same run with priority.reserve [0]: the lows hold all 64 workers
    and the high request can only start after one of them has replied --
    what the reserve is for (and proof the test above can fail)."""
    server = serve("tests.apps.behaviors:dial_order", "--workers", "64", "--reserve", "0",
                   *PRIO, env={"QSTACK_TEST_DIAL": str(downstream.port)})
    lows = send(server, b"L\n", 64)
    assert downstream.wait_for(64) == 64
    high, = send(server, b"H\n")
    time.sleep(0.2)
    assert downstream.count() == 64     # no worker for it
    downstream.release()
    n_high, _ = (int(x) for x in recv_line(high).split())
    assert n_high > 0
    for s in lows:
        recv_line(s)
        s.close()
    high.close()
