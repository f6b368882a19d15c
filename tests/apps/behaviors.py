"""Handlers the tests serve: each shows one behaviour of the runtime."""

import itertools
import os

import gevent
from gevent import socket as gsocket

import qstack

_seq = itertools.count()
_holds = itertools.count()


def hold():
    """Wait (cooperatively) for the gate file named by $QSTACK_TEST_GATE,
    keeping this worker busy; on the way in, create <gate>.started.<n> so a
    test can see the handler is running."""
    gate = os.environ["QSTACK_TEST_GATE"]
    open(f"{gate}.started.{next(_holds)}", "w").close()
    for _ in range(3000):                   # bounded: 30 s at most
        if os.path.exists(gate):
            break
        gevent.sleep(0.01)
    return b"held\n"


def seq(req):
    """Reply with the order in which requests were served; b"hold" waits for
    the gate file (hold()), keeping its worker busy."""
    if bytes(req.data[:4]) == b"hold":
        return hold()
    return b"%d %d\n" % (next(_seq), req.priority)


def boom(req):
    """Raises on b"boom", echoes everything else."""
    if bytes(req.data).startswith(b"boom"):
        raise RuntimeError("boom requested by the test")
    return req.data


def sleepy(req):
    """b"sleep" sleeps cooperatively; b"dial PORT" uses a cooperative socket
    to a local server that answers after a delay; b"hold" waits for the gate
    file (hold()); the rest echo."""
    data = bytes(req.data)
    if data.startswith(b"hold"):
        return hold()
    if data.startswith(b"sleep"):
        gevent.sleep(1.0)
        return b"slept\n"
    if data.startswith(b"dial"):
        port = int(data.split()[1])
        with gsocket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"?")
            return s.recv(100)
    return req.data


def pid(req):
    return b"%d\n" % os.getpid()


def wrong_type(req):
    return "a str is not bytes"


@qstack.stream
def stream_echo(conn):
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)


@qstack.stream
def stream_upper_then_close(conn):
    data = conn.recv(100)
    conn.sendall(data.upper())
    conn.close()


_replied = itertools.count()


def dial_order(req):
    """Asks the local TCP server at port $QSTACK_TEST_DIAL (one cooperative
    round trip per message, a new connection each), then replies
    b"<n> <priority>" where n counts the replies in the order they are made."""
    port = int(os.environ["QSTACK_TEST_DIAL"])
    s = gsocket.create_connection(("127.0.0.1", port))
    try:
        s.sendall(bytes(req.data))
        s.recv(64)
    finally:
        s.close()
    return b"%d %d\n" % (next(_replied), req.priority)

def ordered(req):
    """Reply order: a line b"KIND MS TAG" sleeps MS milliseconds, then by KIND:
    s (or H, which a rule can make level 0) replies b"TAG\\n"; e replies
    with req.data itself (zero copy); n replies None; b raises; p sends
    b"pre TAG\\n" through req.conn first; c closes through req.conn, then
    replies."""
    kind, ms, tag = bytes(req.data).split()
    if kind == b"p":
        req.conn.send(b"pre " + tag + b"\n")
    gevent.sleep(int(ms) / 1000.0)
    if kind == b"n":
        return None
    if kind == b"b":
        raise RuntimeError("boom requested by the test")
    if kind == b"e":
        return req.data
    if kind == b"c":
        req.conn.close()
    return tag + b"\n"


def blocking(req):
    """b"block" sleeps 1 s *without* yielding to gevent (the whole core
    stops); the rest echo."""
    if bytes(req.data).startswith(b"block"):
        import time
        time.sleep(1.0)
        return b"unblocked\n"
    return req.data


def always_fails(req):
    """Raises on every request."""
    raise ValueError("this handler always fails")


def peer(req):
    """Reply with the client's address as the server saw it: host port\\n."""
    host, port = req.conn.peer
    return b"%s %d\n" % (host.encode(), port)


@qstack.stream
def stream_peer(conn):
    """A stream handler's view of its peer, then close."""
    host, port = conn.peer
    conn.sendall(b"%s %d\n" % (host.encode(), port))
    conn.close()


# --- app.on_connect / app.on_close (tests/test_hooks.py) ----------------------

def _hook_log(line):
    """Append a line to the file named by $QSTACK_TEST_HOOKLOG."""
    with open(os.environ["QSTACK_TEST_HOOKLOG"], "a") as f:
        f.write(line + "\n")


def greet(conn):
    """on_connect: greet, and note the connection."""
    _hook_log(f"open {conn.id:#x}")
    conn.send(b"hello\n")


def refuse(conn):
    """on_connect: close every connection at once."""
    conn.close()


def note_close(conn):
    """on_close: note the connection."""
    _hook_log(f"close {conn.id:#x}")


def hook_fails(conn):
    raise RuntimeError("this hook always fails")
