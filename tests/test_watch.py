"""Failures said and counted (issue 10): the blocked-hub watchdog, handler
errors with measure, the reply-type error, and the native error counters in
--stats and the log.

Behaviour on real servers (kernel backend; both stack layouts where the
hub waits differently); the pure parts (RateLimit, CounterWatch, the reply
type) in-process with time passed in.
"""

import logging
import re
import socket
import time

import gevent
import pytest

from conftest import recv_line
from qstack.coro.errlog import (BURST, CounterWatch, HandlerErrors, RateLimit,
                                reply_type)

BLOCKED = "the hub has not come back"


def stack_after(stderr, marker):
    """The indented lines (a logged stack) right after the line with ``marker``."""
    lines = stderr.splitlines()
    start = next(i for i, ln in enumerate(lines) if marker in ln)
    out = []
    for ln in lines[start + 1:]:
        if not ln.startswith(" "):
            break
        out.append(ln)
    return "\n".join(out)


# -- the watchdog --------------------------------------------------------------

BLOCKERS = {
    "thread": ("tests.apps.behaviors:blocking", "in blocking", "time.sleep(1.0)"),
    "inline": ("tests.apps.behaviors:blocking", "in blocking", "time.sleep(1.0)"),
    # monkey.patch_all() makes logging's locks gevent's: written directly then
    "patched": ("tests.apps.patched:blocking_patched", "in blocking_patched",
                "_real_sleep(1.0)"),
}


@pytest.mark.parametrize("case", sorted(BLOCKERS))
def test_blocking_handler_logs_one_warning_with_its_stack(serve, case):
    app, func, line = BLOCKERS[case]
    stack = "inline" if case == "inline" else "thread"
    server = serve(app, "--framing", "line", "--stack", stack)
    time.sleep(0.4)                         # an idle hub is not a blocked one
    with server.connect() as s:
        s.sendall(b"block\n")
        assert recv_line(s) == b"unblocked\n"
        for i in range(20):                 # served at once afterwards, no warning
            s.sendall(b"ping %d\n" % i)
            assert recv_line(s) == b"ping %d\n" % i
    server.read_until("stderr", lambda err: "the hub is back" in err)
    assert server.stop() == 0
    err = server.stderr
    assert err.count(BLOCKED) == 1, err
    stack = stack_after(err, BLOCKED)
    assert func in stack and line in stack, err
    assert re.search(r"\] WARNING core 0: the hub has not come back for [\d.]+ s", err)
    assert "1 hub blocks" in err
    assert re.search(r"INFO core 0: the hub is back after about (0\.9|1\.)\d* s", err), err


def test_cooperative_waits_and_turning_it_off_say_nothing(serve):
    coop = serve("tests.apps.behaviors:sleepy", "--framing", "line")
    off = serve("tests.apps.behaviors:blocking", "--framing", "line",
                "--block-warning", "0")
    with coop.connect() as a, off.connect() as b:
        a.sendall(b"sleep\n")               # gevent.sleep(1): the hub keeps running
        b.sendall(b"block\n")
        assert recv_line(a) == b"slept\n"
        assert recv_line(b) == b"unblocked\n"
    for server in (coop, off):
        assert server.stop() == 0
        assert BLOCKED not in server.stderr, server.stderr
        assert "0 hub blocks" in server.stderr


def test_watchdog_in_process_idle_then_blocked_once(caplog):
    from qstack.coro.watchdog import BlockWatchdog

    def busy_here():
        time.sleep(0.3)

    gevent.sleep(0)                         # gevent's hub is running
    with caplog.at_level(logging.INFO, logger="qstack"):
        wd = BlockWatchdog(gevent.get_hub().loop, 0.05, "test").start()
        try:
            gevent.sleep(0.3)               # idle in the loop: not blocked
            busy_here()
            gevent.sleep(0.2)               # the loop turns again
        finally:
            wd.stop()
    said = [r.getMessage() for r in caplog.records]
    blocked = [m for m in said if BLOCKED in m]
    assert len(blocked) == 1 and "in busy_here" in blocked[0], said
    assert wd.blocks == 1
    assert any("the hub is back after about 0.3" in m for m in said), said


# -- handler errors --------------------------------------------------------------

def test_failing_handler_logs_a_bounded_number_of_tracebacks(serve):
    server = serve("tests.apps.behaviors:always_fails", "--framing", "line")
    n = 200
    for _ in range(n):
        with server.connect() as s:
            s.sendall(b"x\n")
            assert s.recv(10) == b""        # each failure closes its connection
    assert server.stop() == 0
    err = server.stderr
    assert err.count("ValueError: this handler always fails") == BURST, err[-3000:]
    assert err.count("handler raised; closing 127.0.0.1:") == BURST
    assert re.search(rf"\b{n - BURST} more handler errors in the last [\d.]+ s", err), err[-2000:]
    assert f"{n} handler errors" in err     # the exit line counts every one


def test_non_bytes_reply_names_its_type(serve):
    server = serve("tests.apps.behaviors:wrong_type")
    with server.connect() as s:
        s.sendall(b"x")
        assert s.recv(10) == b""
    assert server.stop() == 0
    assert "handler returned a non-bytes reply (str;" in server.stderr, server.stderr
    assert "Traceback" not in server.stderr


# -- native counters -------------------------------------------------------------

def test_stats_and_log_show_protocol_errors_after_an_oversized_frame(serve):
    server = serve("apps.echo:handle", "--framing", "length:4", "--stats")
    with server.connect() as s:
        port = s.getsockname()[1]
        s.sendall(b"\xff\xff\xff\xff")      # announces 4 GiB: above app.max_message
        with pytest.raises((ConnectionResetError, EOFError)):
            if not s.recv(10):
                raise EOFError
    # a stats line and a check of the counter (each once a second)
    server.read_until("stdout", lambda out: "protocol_errors 1" in out)
    server.read_until("stderr", lambda err: "new protocol errors" in err)
    assert server.stop() == 0
    lines = [ln for ln in server.stdout.splitlines() if ln.startswith("core 0")]
    assert lines and "protocol_errors 1" in lines[-1], server.stdout
    assert "accept_errors 0" in lines[-1] and "paused 0" in lines[-1]
    err = server.stderr
    assert re.search(r"WARNING core 0: 1 new protocol errors \(1 since the core started; "
                     rf"the last from 127\.0\.0\.1:{port}\): oversized or malformed", err), err
    assert "1 protocol errors, 0 accept errors, 0 paused connections" in err


# -- the pure parts ----------------------------------------------------------------

def test_rate_limit_says_a_burst_per_window_and_counts_the_rest():
    rl = RateLimit(burst=2, interval=10.0)
    assert [rl.hit(t) for t in (0.0, 1.0, 2.0, 3.0)] == [True, True, False, False]
    assert rl.due(9.0) == (0, 0.0)          # the window runs on
    assert rl.due(10.5) == (2, 10.0)
    assert rl.due(10.6) == (0, 0.0)         # said once
    assert rl.hit(10.7) and rl.hit(10.8) and not rl.hit(10.9)
    assert rl.due(12.0, force=True) == (1, pytest.approx(1.3))


def test_counter_watch_says_the_first_increase_then_at_most_once_per_quiet():
    w = CounterWatch("protocol errors", "reset", quiet=10.0)
    assert w.update(0, 0.0) is None
    assert w.update(3, 1.0) == "3 new protocol errors (3 since the core started): reset"
    assert w.update(5, 2.0) is None         # quiet
    assert w.update(9, 11.5) == "6 new protocol errors (9 since the core started): reset"
    assert w.update(9, 30.0) is None
    assert w.update(10, 31.0, force=True).startswith("1 new")
    asked = []
    assert w.update(10, 40.0, peer=lambda: asked.append(1)) is None
    assert not asked                        # asked only when there is a line
    assert w.update(12, 41.0, force=True, peer=lambda: "127.0.0.1:4000") == \
        "2 new protocol errors (12 since the core started; the last from 127.0.0.1:4000): reset"


def test_reply_type_only_for_errors_raised_by_the_hub():
    def handler():
        bytearray() + "x"                   # the handler's own TypeError
    with pytest.raises(TypeError) as handler_exc:
        handler()
    assert reply_type(handler_exc.value) is None
    hub_code = compile("tx = bytearray()\ntx += 5", "hub.py", "exec")
    with pytest.raises(TypeError) as hub_exc:
        exec(hub_code, {"__name__": "qstack.coro.hub"})
    assert reply_type(hub_exc.value) == "int"
    assert reply_type(ValueError("bytearray")) is None


def test_held_handler_errors_are_said_when_the_window_ends(caplog):
    said = HandlerErrors(gevent.get_hub().loop, burst=1, interval=0.2)
    with caplog.at_level(logging.ERROR, logger="qstack"):
        for _ in range(4):
            try:
                raise RuntimeError("x")
            except RuntimeError as exc:
                said.failed(7, exc)
        gevent.sleep(0.35)                  # the window's timer fires
    text = [r.getMessage() for r in caplog.records]
    assert text[0] == "handler raised; closing connection 0x7"
    assert text[1:] == ["3 more handler errors in the last 0.2 s (only the first 1 of "
                        "each 0.2 s are logged in full)"]


def test_peer_name_says_host_and_port():
    from qstack.coro.errlog import peer_name
    assert peer_name(("127.0.0.1", 4000)) == "127.0.0.1:4000"
    assert peer_name(("::1", 4000)) == "[::1]:4000"
    assert peer_name(None) is None
