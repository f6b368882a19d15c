"""--metrics: Prometheus text format, scraped for real and parsed with
prometheus_client's own parser; one core (served by the core) and two
(served by the supervisor, summed, monotonic across a crash)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qstack.metrics import Aggregate, render
from qstack.stats import bucket_of

from test_cli import needs_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def samples(text):
    """{(name, frozenset(labels)): value} of a text exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed, metric, **labels):
    return parsed[(metric, frozenset((k, str(v)) for k, v in labels.items()))]


def snap(core, requests, lat_ns=50_000, conns=3):
    lat = [0] * 328
    lat[bucket_of(lat_ns)] = requests
    return {"core": core, "t": time.monotonic(), "conns": conns, "accepted": conns,
            "bufs_in_use": 1, "bufs_total": 64, "cpu_stack": 0.5, "cpu_hub": 0.25,
            "errors": 1, "protocol_errors": 2, "accept_errors": 0, "hub_blocks": 0,
            "paused_conns": 0, "counters": {"pool_timeouts": [0, 4]},
            "levels": [{"requests": requests, "bytes_in": 10 * requests,
                        "bytes_out": 10 * requests, "replies": requests, "queued": 5,
                        "lat": lat}, {"requests": 0, "bytes_in": 0, "bytes_out": 0,
                                      "replies": 0, "queued": 0, "lat": [0] * 328}]}


def test_aggregate_sums_cores_and_keeps_counters_of_exited_ones():
    agg = Aggregate(2)
    agg.update(100, snap(0, 10))
    agg.update(200, snap(1, 20))
    p = samples(render(agg).decode())
    assert value(p, "qstack_requests_total", level=0) == 30
    assert value(p, "qstack_connections_open") == 6
    assert value(p, "qstack_queue_depth", level=0) == 10
    assert value(p, "qstack_cores") == 2
    assert value(p, "qstack_request_latency_seconds_count", level=0) == 30
    assert value(p, "qstack_request_latency_seconds_bucket", level=0, le="5e-05") == 0
    assert value(p, "qstack_request_latency_seconds_bucket", level=0, le="0.0001") == 30
    assert 30 * 45e-6 < value(p, "qstack_request_latency_seconds_sum", level=0) < 30 * 60e-6
    assert value(p, "qstack_app_events_total", name="pool_timeouts", level=1) == 8
    # Core 1 crashes: its counters stay, its gauges go; the new process starts at 0.
    agg.retire(200)
    agg.restarted(1)
    agg.update(300, snap(1, 1))
    p = samples(render(agg).decode())
    assert value(p, "qstack_requests_total", level=0) == 31
    assert value(p, "qstack_connections_open") == 6
    assert value(p, "qstack_core_restarts_total", core=1) == 1
    assert value(p, "qstack_protocol_errors_total") == 6


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port, timeout=2):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return samples(r.read().decode())


class Server:
    def __init__(self, *args):
        self.port, self.mport = free_port(), free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qstack", "serve", "apps.echo:handle", "--port",
             str(self.port), "--metrics", f"127.0.0.1:{self.mport}",
             "--stats-interval", "0.2", *args], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait(self, pred, what, timeout=20):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read()
            try:
                last = scrape(self.mport)
                if pred(last):
                    return last
            except OSError:
                pass
            time.sleep(0.1)
        pytest.fail(f"{what}: last scrape {last}")

    def echo(self, n):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as c:
            for _ in range(n):
                c.sendall(b"ping")
                got = b""
                while len(got) < 4:
                    got += c.recv(4 - len(got))

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=15)
        finally:
            self.proc.kill()
        return self.proc.returncode, err


@needs_server
def test_one_core_serves_its_own_metrics():
    srv = Server()
    try:
        srv.wait(lambda p: value(p, "qstack_cores") == 1, "up")
        srv.echo(25)
        p = srv.wait(lambda p: value(p, "qstack_requests_total", level=1) >= 25, "requests")
        assert value(p, "qstack_sent_bytes_total", level=1) >= 100
        assert value(p, "qstack_request_latency_seconds_count", level=1) >= 25
        assert value(p, "qstack_connections_accepted_total") >= 1
        assert value(p, "qstack_buffers_total") > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.mport}/nope", timeout=2) as r:
            pytest.fail(f"expected 404, got {r.status}")
    except urllib.error.HTTPError as e:
        assert e.code == 404
    finally:
        rc, err = srv.stop()
    assert rc == 0, err


@needs_server
def test_supervisor_sums_cores_and_counts_restarts():
    srv = Server("--cores", "2")
    try:
        srv.wait(lambda p: value(p, "qstack_cores") == 2, "two cores")
        for _ in range(4):          # SO_REUSEPORT spreads connections over cores
            srv.echo(10)
        p = srv.wait(lambda p: value(p, "qstack_requests_total", level=1) >= 40, "requests")
        before = value(p, "qstack_requests_total", level=1)
        # Kill one core: the supervisor restarts it; nothing goes backwards.
        pids = subprocess.run(["pgrep", "-P", str(srv.proc.pid)], capture_output=True,
                              text=True).stdout.split()
        assert len(pids) == 2
        os.kill(int(pids[0]), signal.SIGKILL)
        p = srv.wait(lambda p: sum(v for (n, _), v in p.items()
                                   if n == "qstack_core_restarts_total") == 1
                     and value(p, "qstack_cores") == 2, "restart")
        assert value(p, "qstack_requests_total", level=1) >= before - 10  # last interval
    finally:
        rc, err = srv.stop()
    assert rc == 0, err


def test_metrics_port_in_use_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for cores in ("1", "2"):
            res = subprocess.run([sys.executable, "-m", "qstack", "serve", "apps.echo:handle",
                                  "--port", "0", "--cores", cores,
                                  "--metrics", f"127.0.0.1:{port}"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=30)
            assert res.returncode == 2, res.stderr
            assert res.stderr.splitlines()[-1] == \
                f"qstack: error: metrics.listen: port {port} on 127.0.0.1 is already in use"
    res = subprocess.run([sys.executable, "-m", "qstack", "serve", "apps.echo:handle",
                          "--metrics", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "metrics.listen: expected HOST:PORT" in res.stderr
