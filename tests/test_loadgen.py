"""`qstack load`: the native load generator against real qstack servers.

Pure parts first (histogram layout and quantiles, the burst schedule, the
priority draw, message formats, cdf.txt), then the command as a user runs
it: bad input and limits as one line, refused connections counted, exact
message counts and priorities checked against the server's own counts,
quantiles against a handler with a known delay, iotep, and --smp with --ips
holding more connections than one process may have files.
"""

import importlib.util
import json
import os
import random
import resource
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, free_port, recv_exact

pytestmark = pytest.mark.skipif(importlib.util.find_spec("qstack._loadgen") is None,
                                reason="needs the load engine (qstack._loadgen)")

from qstack.errors import ConfigError  # noqa: E402
from qstack.loadgen import options as opts  # noqa: E402
from qstack.loadgen import report  # noqa: E402
from qstack.loadgen.hist import BUCKETS, Histogram, bucket_low, bucket_of, bucket_width  # noqa

ECHO_SERVE = ("--framing", "fixed:64", "--priority", "offset=5,value=0x01")


def lib():
    from qstack._loadgen import ffi, lib
    return ffi, lib


def load(*args, timeout=90):
    return subprocess.run([sys.executable, "-m", "qstack", "load", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def load_json(tmp_path, *args, timeout=90):
    out = tmp_path / "out.json"
    res = load(*args, "--json", str(out), timeout=timeout)
    assert "Traceback" not in res.stderr, res.stderr
    assert out.exists(), (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    return res, json.loads(out.read_text())


def server_counts(srv, size=64):
    with srv.connect() as s:
        s.sendall(b"STATS".ljust(size, b" "))
        high, low, req, hb = (int(x) for x in recv_exact(s, size).split()[:4])
    return {"high": high, "low": low, "requests": req, "heartbeats": hb}


def assert_one_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qstack: error: "), res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


# ---- pure: histogram ---------------------------------------------------------

def test_histogram_layout_matches_the_engine():
    ffi, L = lib()
    assert BUCKETS == L.QSL_HIST_BUCKETS
    rng = random.Random(7)
    values = [0, 1, 2047, 2048, 2049, 4095, 4096, 10**6, 2**40 - 1, 2**40, 2**50]
    values += [rng.randrange(1 << rng.randrange(1, 44)) for _ in range(3000)]
    for v in values:
        b = bucket_of(v)
        assert b == L.qsl_hist_bucket_of(v), v
        assert bucket_low(b) == L.qsl_hist_bucket_low(b)
        assert bucket_width(b) == L.qsl_hist_bucket_width(b)
        if b < BUCKETS - 1:
            assert bucket_low(b) <= v < bucket_low(b) + bucket_width(b)
            assert bucket_width(b) <= max(1, v / 1024)    # 3 significant digits


def test_histogram_quantiles_against_known_data():
    rng = random.Random(3)
    values = [rng.randrange(1000, 50_000_000) for _ in range(20_000)]
    h = Histogram.from_values(values)
    ordered = sorted(values)
    for q in (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999):
        exact = ordered[max(1, -(-int(q * 1e12) * len(values) // 10**12)) - 1]
        got = h.quantile(q)
        assert exact <= got <= exact * (1 + 1 / 1024) + 1, (q, exact, got)
    assert h.quantile(1.0) == max(values) and h.quantile(0) == min(values)
    assert h.mean() == pytest.approx(sum(values) / len(values))
    # merging halves is exact: same buckets, same quantiles
    a = Histogram.from_values(values[:7000])
    b = Histogram.from_values(values[7000:])
    m = Histogram.merged([a, b])
    assert m.counts == h.counts and (m.count, m.min, m.max) == (h.count, h.min, h.max)
    assert Histogram().quantile(0.5) is None


# ---- pure: schedule, priorities, messages ------------------------------------

def test_burst_schedule_spreads_blocks_over_the_epoch():
    ffi, L = lib()
    epoch = 1_000_000_000
    offs = [L.qsl_burst_offset_ns(i, 10, 3, epoch) for i in range(10)]
    # ceil(10/3) = 4 blocks of 3 (the last has 1): MCC's -b, remainder included
    assert offs == [0, 0, 0, 250_000_000, 250_000_000, 250_000_000,
                    500_000_000, 500_000_000, 500_000_000, 750_000_000]
    # burst 1: every connection alone, evenly spaced; burst >= n: all at once
    assert [L.qsl_burst_offset_ns(i, 4, 1, epoch) for i in range(4)] == \
        [0, 250_000_000, 500_000_000, 750_000_000]
    assert {L.qsl_burst_offset_ns(i, 5, 9, epoch) for i in range(5)} == {0}
    # the schedule is global: any split over processes gives the same offsets
    o = opts.validate(host="127.0.0.1", port=1, connections=1001, smp=3, burst=7)
    plan = opts.plan_processes(o)
    assert [n for _, n in plan] == [334, 334, 333]
    assert [f for f, _ in plan] == [0, 334, 668]
    assert opts.split(5, 3) == [2, 2, 1]


def test_priority_draw_share_and_grain():
    ffi, L = lib()
    n = 40_000
    high = sum(L.qsl_is_high(1, 0.3, L.QSL_GRAIN_MESSAGE, g % 100, g // 100) for g in range(n))
    sigma = (0.3 * 0.7 / n) ** 0.5
    assert abs(high / n - 0.3) < 4 * sigma
    assert L.qsl_is_high(5, 0.0, 0, 1, 1) == 0 and L.qsl_is_high(5, 1.0, 0, 1, 1) == 1
    for g in range(50):   # per connection: every message alike
        assert len({L.qsl_is_high(9, 0.5, L.QSL_GRAIN_CONN, g, k) for k in range(20)}) == 1
    # deterministic: same seed, same draws
    assert [L.qsl_is_high(2, 0.5, 0, 3, k) for k in range(64)] == \
        [L.qsl_is_high(2, 0.5, 0, 3, k) for k in range(64)]


def test_message_formats():
    ffi, L = lib()
    buf = ffi.new("uint8_t[]", 64)
    assert L.qsl_msg_build(L.QSL_PROTO_ECHO, buf, 64, 7, 12, 1) == 64
    raw = bytes(ffi.buffer(buf, 64))
    assert raw[0:4] == (12).to_bytes(4, "little") and raw[5] == 1 and raw[4] == 0x51
    high = ffi.new("int32_t *")
    assert L.qsl_msg_check(buf, 64, 7, high) == 12 and high[0] == 1
    assert L.qsl_msg_check(buf, 64, 8, high) < 0          # another connection's
    for pos in (0, 5, 20, 63):                              # any corrupted byte
        bad = bytearray(raw)
        bad[pos] ^= 0x40
        assert L.qsl_msg_check(ffi.from_buffer(bytes(bad)), 64, 7, high) < 0
    assert L.qsl_msg_build(L.QSL_PROTO_ECHO, buf, 15, 7, 1, 0) < 0   # too short
    # iotep: counter LE in 0..3, byte 5 request/heartbeat, byte 6 = 2, byte 8 = 8 in heartbeats
    assert L.qsl_msg_build(L.QSL_PROTO_IOTEP, buf, 16, 0, 0x01020304, 1) == 16
    req = bytes(ffi.buffer(buf, 16))
    assert req == bytes([4, 3, 2, 1, 0, 1, 2, 0, 0]) + bytes(7)
    L.qsl_msg_build(L.QSL_PROTO_IOTEP, buf, 16, 0, 5, 0)
    assert bytes(ffi.buffer(buf, 16)) == bytes([5, 0, 0, 0, 0, 0, 2, 0, 8]) + bytes(7)


def test_cdf_layout_round_trip():
    high = Histogram.from_values([1_000_000 * (i + 1) for i in range(100)])   # 1..100 ms
    low = Histogram()
    text = report.cdf_text(42, [high, low])
    lines = text.splitlines()
    assert lines[0].startswith("connections:42,avg_delay:50.5")
    labels = [line.split(":")[0] for line in lines[1:]]
    assert labels == ["0.10", "0.20", "0.30", "0.40", "0.50", "0.60", "0.70", "0.80", "0.90",
                      "0.95", "0.99", "0.9990", "0.9999", "1.0000"]
    parsed = report.parse_cdf(text)
    assert parsed["connections"] == 42 and parsed["avg_delay"] == pytest.approx(50.5)
    rows = {q: (t, h, lo) for q, t, h, lo in parsed["rows"]}
    assert rows[0.5][0] == pytest.approx(50.0, rel=2e-3) and rows[0.5][1] == rows[0.5][0]
    assert rows[0.9][0] == pytest.approx(90.0, rel=2e-3)
    assert rows[1.0][0] == pytest.approx(100.0)
    assert all(lo != lo for _, _, lo in rows.values())    # nan: no low-priority replies
    assert [q for q, *_ in parsed["rows"]] == list(report.CDF_QUANTILES)


def test_limits_are_checked_up_front():
    o = opts.validate(host="127.0.0.1", port=1, connections=50_000, smp=1)
    with pytest.raises(ConfigError, match=r"--smp 3 or more"):
        opts.check_limits(o, (20_000, 20_000), (32768, 60999))
    o = opts.validate(host="127.0.0.1", port=1, connections=60_000, smp=4)
    with pytest.raises(ConfigError, match=r"--ips 3 or more"):
        opts.check_limits(o, (20_000, 20_000), (32768, 60999))
    o = opts.validate(host="127.0.0.1", port=1, connections=60_000, smp=4, ips=3)
    assert opts.check_limits(o, (20_000, 20_000), (32768, 60999)) == []
    assert opts.source_addresses(3) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert "127.0.1.0" not in opts.source_addresses(300)


# ---- the command: errors ------------------------------------------------------

def test_bad_input_is_one_line():
    assert_one_error(load("-c", "10"), "--dest HOST:PORT is required")
    assert_one_error(load("--dest", "127.0.0.1:80", "-r", "1.5"), "-r/--ratio", "1.5")
    assert_one_error(load("--dest", "127.0.0.1:80", "-l", "8"), "-l/--length", "16")
    assert_one_error(load("--dest", "127.0.0.1:99999"), "1..65535")
    assert_one_error(load("--dest", "8.8.8.8:53"), "not a loopback", "--allow-remote")
    assert_one_error(load("--dest", "127.0.0.1:80", "--closed", "--rate", "5"), "--closed")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1_000_000:
        assert_one_error(load("--dest", "127.0.0.1:80", "-c", str(hard + 10)),
                         "open files", "--smp 2")
    assert_one_error(load("--dest", "127.0.0.1:80", "-c", "90000", "--smp", "9"),
                     "source ports", "--ips")


def test_plot_without_matplotlib_says_so(tmp_path):
    fake = tmp_path / "matplotlib"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    res = subprocess.run([sys.executable, "-m", "qstack", "load", "--dest", "127.0.0.1:80",
                          "--plot", str(tmp_path / "x.png")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30)
    assert_one_error(res, "--plot needs matplotlib", "qstack[plot]")


def test_refused_connections_are_retried_and_reported(tmp_path):
    port = free_port()     # nothing listens there
    res, doc = load_json(tmp_path, "--dest", f"127.0.0.1:{port}", "-c", "3", "-s", "0",
                         "-w", "0", "-d", "1", "--retry-delay", "0.2", "-q",
                         "--no-check")
    assert res.returncode == 1
    c = doc["connections"]
    assert c["established"] == 0 and c["errors"]["refused"] >= 6 and c["retries"] >= 3
    assert any("refused" in p for p in doc["problems"])
    assert "refused" in res.stdout and doc["status"] == "failed"


# ---- the command against real servers ----------------------------------------

def test_exact_counts_and_priority_share(serve, tmp_path):
    srv = serve("tests.apps.loadgen_apps:counting", *ECHO_SERVE)
    # 50 connections x 1 s / 0.2 s epochs = exactly 250 messages in the window
    res, doc = load_json(tmp_path, "--dest", f"127.0.0.1:{srv.port}", "-c", "50",
                         "-s", "0.3", "-w", "0.4", "-e", "0.2", "-b", "10", "-l", "64",
                         "-r", "0.3", "-d", "1", "--log-duration", "0.5")
    assert res.returncode == 0, res.stdout + res.stderr
    m, w = doc["messages"], doc["window"]
    assert m["sent"] == w["sent"] == 250 and m["requests"] == 250
    assert m["responses"] == w["responses"] == 250 and w["incomplete"] == 0
    assert m["bad_replies"] == m["unsolicited"] == m["missed"] == m["lost"] == 0
    assert doc["connections"]["connected"] == 50 and doc["connections"]["retries"] == 0
    srv_counts = server_counts(srv)
    assert srv_counts["high"] == m["sent_high"] and srv_counts["low"] == m["sent_low"]
    sigma = (0.3 * 0.7 / 250) ** 0.5
    assert m["sent_high"] > 0 and m["sent_low"] > 0
    assert abs(m["sent_high"] / 250 - 0.3) < 4 * sigma
    lat = doc["latency_ms"]
    assert lat["high"]["count"] == m["sent_high"] and lat["low"]["count"] == m["sent_low"]
    assert lat["all"]["count"] == 250
    # the human output: a progress line a second, interval reports, the summary
    progress = [ln for ln in res.stdout.splitlines() if ln.startswith("[")]
    assert progress and all(k in progress[-1] for k in
                            ("connected 50", "retries 0", "sent", "requests", "responses",
                             "rate"))
    assert "latency over the last 0.5 s" in res.stdout and "--- qstack load: ok" in res.stdout
    assert len(doc["intervals"]) == 2


def test_quantiles_match_a_known_delay(serve, tmp_path):
    srv = serve("tests.apps.loadgen_apps:sleepy", *ECHO_SERVE)
    cdf = tmp_path / "cdf.txt"
    res, doc = load_json(tmp_path, "--dest", f"127.0.0.1:{srv.port}", "-c", "20",
                         "-s", "0.2", "-w", "0.3", "-e", "0.1", "-b", "5", "-r", "0.5",
                         "-d", "1", "--cdf", str(cdf), "-q")
    assert res.returncode == 0, res.stdout + res.stderr
    delay = 20.0   # ms, tests/apps/loadgen_apps.DELAY
    lat = doc["latency_ms"]
    assert lat["all"]["count"] == 200
    for level in ("all", "high", "low"):
        assert lat[level]["min"] >= delay
        assert delay <= lat[level]["p50"] < delay + 10, lat[level]
    parsed = report.parse_cdf(cdf.read_text())
    assert parsed["connections"] == 20
    assert parsed["avg_delay"] == pytest.approx(lat["all"]["mean"], rel=1e-4)
    rows = {q: vals for q, *vals in parsed["rows"]}
    assert len(rows) == 14 and all(v >= delay for vals in rows.values() for v in vals)
    assert rows[0.5][0] == pytest.approx(lat["all"]["p50"], abs=1e-4)
    assert rows[1.0][0] == pytest.approx(lat["all"]["max"], abs=1e-4)
    assert doc["cdf_ms"]["all"][4] == pytest.approx(lat["all"]["p50"])


def test_latency_from_the_write_leaves_out_the_clients_lateness(serve, tmp_path):
    """Due every 10 ms, answered after 20 ms, one request in flight per
    connection: every send waits for the previous reply, so the client falls
    further behind its schedule all run long.  Timed from the schedule the
    requests are charged that wait; timed from their write (what a monitor
    on the wire sees), only the server's 20 ms."""
    srv = serve("tests.apps.loadgen_apps:sleepy", *ECHO_SERVE)
    res, doc = load_json(tmp_path, "--dest", f"127.0.0.1:{srv.port}", "-c", "4",
                         "-s", "0.1", "-w", "0.1", "-e", "0.01", "-b", "4", "--window", "1",
                         "-d", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    delay = 20.0   # ms, tests/apps/loadgen_apps.DELAY
    lat, written = doc["latency_ms"]["all"], doc["latency_from_write_ms"]["all"]
    assert doc["messages"]["deferred"] > 0 and doc["messages"]["max_lag_ms"] > 5 * delay
    assert written["count"] == lat["count"] > 0
    assert delay <= written["min"] and written["p50"] < delay + 10, written
    assert lat["p50"] > 3 * delay, lat
    assert "the same from when each was written" in res.stdout


def test_iotep_requests_get_replies_heartbeats_do_not(serve, tmp_path):
    srv = serve("tests.apps.loadgen_apps:iotep", "--framing", "fixed:40",
                "--priority", "offset=5,value=0x01")
    res, doc = load_json(tmp_path, "--dest", f"127.0.0.1:{srv.port}", "--protocol", "iotep",
                         "-l", "40", "--reply-len", "32", "-c", "30", "-s", "0.2", "-w", "0.3",
                         "-e", "0.25", "-r", "0.4", "-d", "1", "-q")
    assert res.returncode == 0, res.stdout + res.stderr
    m = doc["messages"]
    assert m["sent"] == 120 and m["requests"] == m["sent_high"] == m["responses"]
    got = server_counts(srv, 40)
    assert got["requests"] == m["sent_high"] and got["heartbeats"] == m["sent_low"]
    assert m["sent_high"] > 0 and m["sent_low"] > 0
    assert doc["latency_ms"]["low"]["count"] == 0 and doc["latency_ms"]["low"]["p50"] is None


def test_plot_is_written(serve, tmp_path):
    pytest.importorskip("matplotlib")
    srv = serve("tests.apps.loadgen_apps:counting", *ECHO_SERVE)
    png = tmp_path / "cdf.png"
    res = load("--dest", f"127.0.0.1:{srv.port}", "-c", "10", "-s", "0.1", "-w", "0.1",
               "-e", "0.1", "-d", "0.5", "-q", "--plot", str(png))
    assert res.returncode == 0, res.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smp_and_ips_beyond_one_process_file_limit(serve, tmp_path):
    """More connections than one process may hold files: two load processes
    over three source addresses, two server cores (each holds its own)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 40_000:
        pytest.skip("this test is sized for a 20,000 open-file limit")
    conns = hard + 2_000
    srv = serve("apps.echo:handle", "--cores", "2", *ECHO_SERVE)
    res, doc = load_json(tmp_path, "--dest", f"127.0.0.1:{srv.port}", "-c", str(conns),
                         "--smp", "2", "--ips", "3", "-s", "3", "-w", "1", "-e", "2",
                         "-b", "500", "-d", "2", "-q", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    c, m = doc["connections"], doc["messages"]
    assert c["connected"] == conns and c["max_connected"] == conns
    assert m["sent"] == m["responses"] == conns and doc["window"]["incomplete"] == 0


# --- unanswered requests ----------------------------------------------------------

class ThreadServer:
    """A plain socket server with a per-connection function, for behaviours no
    qstack handler should have (never replying, dropping one reply)."""

    def __init__(self, on_conn):
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.on_conn = on_conn
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            self.on_conn(c)
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def read_forever(c):
    while c.recv(65536):
        pass


def test_a_server_that_never_replies_fails_the_run_with_a_reason(tmp_path):
    srv = ThreadServer(read_forever)
    try:
        res, doc = load_json(tmp_path, "--dest", f"127.0.0.1:{srv.port}", "-c", "4",
                             "-s", "0.1", "-w", "0.1", "-e", "0.1", "-d", "1",
                             "--drain", "0.3", "--log-duration", "0")
    finally:
        srv.close()
    assert res.returncode == 1, res.stdout
    assert doc["status"] == "failed"
    assert "status ok" not in res.stdout and "--- qstack load: failed ---" in res.stdout
    n = doc["messages"]["requests"]
    assert n > 0 and doc["messages"]["unanswered"] == n
    assert (f"error: {n} of {n} requests (100.00%) got no reply, more than --max-lost 0 "
            "allows") in res.stdout
    assert "the server never replied" in res.stdout


def iotep_dropping_counter_3(c):
    """iotep, 100-byte messages: requests get a 32-byte reply that starts with
    their counter, except the request with counter 3 (its reply is lost)."""
    buf = b""
    while True:
        chunk = c.recv(65536)
        if not chunk:
            return
        buf += chunk
        while len(buf) >= 100:
            msg, buf = buf[:100], buf[100:]
            if msg[5] == 1 and int.from_bytes(msg[:4], "little") != 3:
                c.sendall(msg[:4] + b"R" * 28)


def test_iotep_one_lost_reply_is_counted_not_charged_to_later_ones(tmp_path):
    srv = ThreadServer(iotep_dropping_counter_3)
    args = ("--dest", f"127.0.0.1:{srv.port}", "--protocol", "iotep", "-l", "100",
            "--reply-len", "32", "-c", "1", "-r", "1", "-s", "0.1", "-w", "0.1", "-e", "0.05",
            "-d", "1", "--drain", "0.5", "--reply-timeout", "0.3", "--log-duration", "0")
    try:
        res, doc = load_json(tmp_path, *args)
        res2, doc2 = load_json(tmp_path, *args, "--max-lost", "0.1")
    finally:
        srv.close()
    m = doc["messages"]
    assert m["requests"] >= 15 and m["unanswered"] == 1, m
    assert m["timed_out"] == 1 and m["responses"] == m["requests"] - 1
    assert m["matched_by_counter"] == m["responses"]
    assert m["unsolicited"] == 0 and m["bad_replies"] == 0
    # the replies after the lost one are matched to their own requests: none is
    # charged the 50 ms epochs the lost one waited
    assert doc["latency_ms"]["high"]["max"] < 40, doc["latency_ms"]["high"]
    assert res.returncode == 1 and "got no reply, more than --max-lost 0 allows" in res.stdout
    assert "1 given up after --reply-timeout 0.3 s" in res.stdout
    assert res2.returncode == 0, res2.stdout
    assert doc2["status"] == "ok"


def test_max_lost_is_a_share():
    res = load("--dest", "127.0.0.1:9", "--max-lost", "1.5")
    assert_one_error(res, "--max-lost is a share of requests, 0..1, got 1.5")


def test_closed_port_fails_within_a_second():
    port = free_port()     # nothing listens there
    t0 = time.monotonic()
    res = load("--dest", f"127.0.0.1:{port}", "-c", "3", "-d", "30", "-q", timeout=30)
    took = time.monotonic() - t0
    assert res.returncode == 1, res
    assert f"cannot connect to 127.0.0.1:{port}" in res.stderr
    assert "connection refused" in res.stderr and "--wait-server" in res.stderr
    assert "Traceback" not in res.stderr
    assert took < 1 + 2, took    # + the interpreter's start-up


def test_wait_server_waits_for_a_late_server():
    import threading
    port = free_port()
    t0 = time.monotonic()
    res = {}

    def run():
        res["r"] = load("--dest", f"127.0.0.1:{port}", "--wait-server", "0.6", "-c", "1",
                        "-d", "30", "-q", timeout=30)
    th = threading.Thread(target=run)
    th.start()
    th.join()
    assert res["r"].returncode == 1 and "after waiting 0.6 s" in res["r"].stderr
    assert time.monotonic() - t0 >= 0.6


def test_percentile_spectrum_steps_sit_at_one_over_one_minus_q():
    from qstack.loadgen.report import spectrum_points
    h = Histogram.from_values(range(1, 1001))        # 1..1000 ns, a bucket each
    pts = spectrum_points(h)
    assert pts[0] == (1.0, 1)                         # q = 0
    xs = dict((v, x) for x, v in pts)
    assert xs[501] == pytest.approx(2.0)              # half the values are below 501
    assert xs[991] == pytest.approx(100.0)            # p99
    assert xs[1000] == pytest.approx(1000.0)          # the last step: 999 of 1000 below
    assert [x for x, _ in pts] == sorted(x for x, _ in pts)
