"""loadtests/locustfile.py: Locust's TCP users against a live qstack server.

Each test runs Locust for a second (headless, then distributed with one
worker) and reads its final stats (``--json-file``): there must be requests
of both priorities and no failures, and the server's own count per priority
level (its native rule on byte 5) must agree with the names Locust gave them.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, free_port, recv_exact

pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                                reason="needs locust (pip install 'qstack[test]')")

LOCUSTFILE = os.path.join(ROOT, "loadtests", "locustfile.py")
ECHO_SERVE = ("--framing", "fixed:64", "--priority", "offset=5,value=0x01")
USERS = 30


def locust(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "locust", "-f", LOCUSTFILE, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def by_name(path):
    """{(type, name): (requests, failures)} from Locust's --json-file output."""
    with open(str(path) + ".json") as f:
        rows = json.load(f)
    return {(r["method"], r["name"]): (r["num_requests"], r["num_failures"]) for r in rows}


def server_counts(srv, size):
    with srv.connect() as s:
        s.sendall(b"STATS".ljust(size, b" "))
        high, low, req, hb = (int(x) for x in recv_exact(s, size).split()[:4])
    return {"high": high, "low": low, "requests": req, "heartbeats": hb}


def check_priorities(stats, kind, srv, size):
    (high, high_fail), (low, low_fail) = stats[(kind, "high")], stats[(kind, "low")]
    assert high > 0 and low > 0, stats
    assert high_fail == 0 and low_fail == 0, stats
    # The server classified the same messages as high: it may have counted a
    # few more (a user stopped with its message in flight), never fewer.
    got = server_counts(srv, size)
    assert 0 <= got["high"] - high <= USERS and 0 <= got["low"] - low <= USERS, (got, stats)
    return high, low


def test_headless_echo_both_priorities_no_failures(serve, tmp_path):
    srv = serve("tests.apps.loadgen_apps:counting", *ECHO_SERVE)
    out = tmp_path / "stats"
    res = locust("--headless", "-u", str(USERS), "-r", str(USERS), "-t", "1s",
                 "--host", f"tcp://127.0.0.1:{srv.port}", "--high-ratio", "0.3",
                 "--epoch", "0.05", "--only-summary", "--json-file", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    high, low = check_priorities(by_name(out), "echo", srv, 64)
    assert 0.15 < high / (high + low) < 0.45     # --high-ratio 0.3, a few hundred draws


def test_headless_iotep_requests_and_heartbeats(serve, tmp_path):
    srv = serve("tests.apps.loadgen_apps:iotep", "--framing", "fixed:40",
                "--priority", "offset=5,value=0x01")
    out = tmp_path / "stats"
    res = locust("--headless", "-u", str(USERS), "-r", str(USERS), "-t", "1s",
                 "--host", f"127.0.0.1:{srv.port}", "--protocol", "iotep",
                 "--msg-len", "40", "--reply-len", "32", "--high-ratio", "0.5",
                 "--epoch", "0.1", "--only-summary", "--json-file", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    stats = by_name(out)
    high, low = check_priorities(stats, "iotep", srv, 40)
    got = server_counts(srv, 40)
    assert got["requests"] == got["high"] and got["heartbeats"] == got["low"]


def test_distributed_master_and_worker(serve, tmp_path):
    srv = serve("tests.apps.loadgen_apps:counting", *ECHO_SERVE)
    out = tmp_path / "stats"
    port = str(free_port())
    master = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", LOCUSTFILE, "--master", "--headless",
         "--master-bind-host", "127.0.0.1", "--master-bind-port", port,
         "--expect-workers", "1", "--expect-workers-max-wait", "30",
         "-u", str(USERS), "-r", str(USERS), "-t", "1s",
         "--host", f"tcp://127.0.0.1:{srv.port}", "--high-ratio", "0.3", "--epoch", "0.05",
         "--only-summary", "--json-file", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", LOCUSTFILE, "--worker",
         "--master-host", "127.0.0.1", "--master-port", port],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, merr = master.communicate(timeout=60)
        _, werr = worker.communicate(timeout=30)
    finally:
        for p in (master, worker):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert master.returncode == 0, merr[-3000:]
    assert worker.returncode == 0, werr[-3000:]
    check_priorities(by_name(out), "echo", srv, 64)


def test_bad_option_is_one_error_line(tmp_path):
    res = locust("--headless", "-u", "1", "-t", "1s", "--host", "tcp://127.0.0.1:9",
                 "--high-ratio", "1.5")
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "--high-ratio must be in 0..1" in res.stderr
    assert "Traceback" not in res.stderr
