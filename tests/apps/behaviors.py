"""Handlers the tests serve: each shows one behaviour of the runtime."""

import itertools
import os

import gevent
from gevent import socket as gsocket

import qstack

_seq = itertools.count()


def seq(req):
    """Reply with the order in which requests were served; b"hold" waits for
    the gate file named by $QSTACK_TEST_GATE, keeping its worker busy."""
    if bytes(req.data[:4]) == b"hold":
        gate = os.environ["QSTACK_TEST_GATE"]
        for _ in range(3000):               # bounded: 30 s at most
            if os.path.exists(gate):
                break
            gevent.sleep(0.01)
        return b"held\n"
    return b"%d %d\n" % (next(_seq), req.priority)


def boom(req):
    """Raises on b"boom", echoes everything else."""
    if bytes(req.data).startswith(b"boom"):
        raise RuntimeError("boom requested by the test")
    return req.data


def sleepy(req):
    """b"sleep" sleeps cooperatively; b"dial PORT" uses a cooperative socket
    to a local server that answers after a delay; the rest echo."""
    data = bytes(req.data)
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
