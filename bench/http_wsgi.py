"""HTTP/1.1 WSGI servers side by side: qstack --wsgi vs granian, gunicorn, uvicorn.

    flock /tmp/qstack-bench.lock .venv/bin/python bench/http_wsgi.py \\
        [--rounds 3] [--duration 10] [--conns 100] [--apps hello,flask]
        [--servers qstack,granian,gunicorn,uvicorn] [--json FILE]

Each server runs alone, pinned to CPU 0 (taskset), serving the same app
from bench/http_apps.py: ``hello`` (a bare WSGI callable, 13-byte body) or
``flask`` (the same answer from a Flask route).  wrk (Debian's ``wrk``)
runs pinned to CPU 1: ``wrk -t1 -c100 -dDs --latency`` over keep-alive
connections, after a 2 s warm-up run.  Rounds interleave the servers; the
median req/s of the rounds is reported, with the spread (max-min over
median) and wrk's p99, then the ratios of qstack to each peer.

Servers:
- qstack: ``qstack serve --wsgi bench.http_apps:APP`` (one core; the stack
  runs inline, as on one CPU it should);
- granian: ``granian --interface wsgi --workers 1`` (its Rust HTTP core;
  the fastest WSGI server we know);
- gunicorn: ``gunicorn -k gevent -w 1`` (greenlets, the closest in spirit);
- uvicorn: ``uvicorn --loop uvloop --http httptools`` (llhttp and uvloop)
  serving the raw ASGI twin of the app (``hello_asgi``, ``prio_asgi``);
  Flask through its WSGI interface (``--interface wsgi``, a thread pool).

The open-loop 2x overload run of the issue is bench/http_overload.py.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
BIN = os.path.dirname(sys.executable)
APPS = {"hello": "bench.http_apps:hello", "flask": "bench.http_apps:flask_app",
        "prio": "bench.http_apps:prio"}
ASGI = {"hello": "bench.http_apps:hello_asgi", "prio": "bench.http_apps:prio_asgi"}
URGENT_LUA = os.path.join(BENCH, "http_urgent.lua")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(server, app, port):
    spec = APPS[app]
    if server in ("qstack", "qstack-off"):
        rule = ["--priority", "path=/api/urgent"] if server == "qstack" else ["--levels", "1"]
        return [os.path.join(BIN, "qstack"), "serve", "--wsgi", spec, "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning", *rule]
    if server == "granian":
        return [os.path.join(BIN, "granian"), "--interface", "wsgi", "--workers", "1",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", spec]
    if server == "gunicorn":
        return [os.path.join(BIN, "gunicorn"), "-k", "gevent", "-w", "1",
                "-b", f"127.0.0.1:{port}", "--log-level", "warning", spec]
    if server == "uvicorn":
        iface = ["--interface", "asgi3"] if app in ASGI else ["--interface", "wsgi"]
        return [os.path.join(BIN, "uvicorn"), "--loop", "uvloop", "--http", "httptools",
                "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning", "--no-access-log", *iface, ASGI.get(app, spec)]
    raise ValueError(server)


def wait_http(port, proc, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not answer in time")


def wrk(port, conns, duration, path="/", script=None, background=False):
    argv = ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency",
            f"http://127.0.0.1:{port}{path}"] + (["-s", script] if script else [])
    if background:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60).stdout
    return parse_wrk(out)


def parse_wrk(out):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    return {"rps": rps, "p99_ms": float(p99.group(1)) * scale[p99.group(2)] if p99 else None,
            "p50_ms": float(p50.group(1)) * scale[p50.group(2)] if p50 else None,
            "non2xx": int(errors.group(1)) if errors else 0}


def run_prio(server, conns, duration):
    """conns - 5 connections keep the 1 ms path busy (a queue as deep as
    they are: the server is saturated); 5 more send /api/urgent, each
    waiting 100 ms between requests (about 5% of the requests)."""
    port = free_port()
    proc = subprocess.Popen(["taskset", "-c", "0"] + command(server, "prio", port), cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_http(port, proc)
        wrk(port, conns - 5, 2, "/work")                  # warm-up
        bulk = wrk(port, conns - 5, duration + 2, "/work", background=True)
        time.sleep(1)
        urgent = wrk(port, 5, duration, "/api/urgent", script=URGENT_LUA)
        out, _ = bulk.communicate(timeout=duration + 60)
        return {"urgent": urgent, "bulk": parse_wrk(out)}
    finally:
        stop_group(proc)


def run_one(server, app, conns, duration):
    port = free_port()
    proc = subprocess.Popen(["taskset", "-c", "0"] + command(server, app, port), cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_http(port, proc)
        wrk(port, conns, 2)                     # warm-up
        return wrk(port, conns, duration)
    finally:
        stop_group(proc)


def stop_group(proc):
    """SIGTERM a server's process group, SIGKILL it after 15 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--conns", type=int, default=100)
    ap.add_argument("--apps", default="hello,flask")
    ap.add_argument("--servers", default="qstack,granian,gunicorn,uvicorn")
    ap.add_argument("--priority", action="store_true",
                    help="instead: /api/urgent latency while the 1 ms path saturates the "
                         "server (servers qstack,qstack-off,granian,gunicorn; closed loop: see "
                         "bench/http_overload.py for the open-loop run)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.priority:
        return main_priority(a)
    if shutil.which("wrk") is None:
        sys.exit("bench/http_wsgi.py: wrk is missing (Debian: apt-get install wrk)")
    servers = a.servers.split(",")
    for s in servers:
        if s != "qstack" and not os.path.exists(os.path.join(BIN, s)):
            sys.exit(f"bench/http_wsgi.py: {s} is not installed in this venv "
                     f"(pip install -e '.[bench]')")
    results = {}
    for app in a.apps.split(","):
        for r in range(a.rounds):
            for server in servers:
                res = run_one(server, app, a.conns, a.duration)
                results.setdefault(app, {}).setdefault(server, []).append(res)
                print(f"{app:6} round {r + 1} {server:9} {res['rps']:>10,.0f} req/s  "
                      f"p99 {res['p99_ms']:.2f} ms  non-2xx {res['non2xx']}", flush=True)
    print()
    summary = {}
    for app, by_server in results.items():
        med = {s: statistics.median(x["rps"] for x in runs) for s, runs in by_server.items()}
        for s, runs in by_server.items():
            rps = [x["rps"] for x in runs]
            spread = (max(rps) - min(rps)) / med[s] * 100
            p99 = statistics.median(x["p99_ms"] for x in runs)
            print(f"{app:6} {s:9} median {med[s]:>10,.0f} req/s  spread {spread:4.1f}%  "
                  f"p99 {p99:.2f} ms")
        if "qstack" in med:
            for s in med:
                if s != "qstack":
                    print(f"{app:6} qstack / {s}: {med['qstack'] / med[s]:.2f}x")
        summary[app] = {"median_rps": med, "runs": by_server}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"conns": a.conns, "duration": a.duration, "results": summary}, f,
                      indent=1)


def main_priority(a):
    servers = ["qstack", "qstack-off", "granian", "gunicorn"] \
        if a.servers == "qstack,granian,gunicorn,uvicorn" else a.servers.split(",")
    results = {}
    for r in range(a.rounds):
        for server in servers:
            res = run_prio(server, a.conns, a.duration)
            results.setdefault(server, []).append(res)
            u, b = res["urgent"], res["bulk"]
            print(f"round {r + 1} {server:10} urgent {u['rps']:>6,.0f} req/s p50 "
                  f"{u['p50_ms']:8.2f} ms p99 {u['p99_ms']:8.2f} ms | 1 ms path "
                  f"{b['rps']:>6,.0f} req/s p99 {b['p99_ms']:8.2f} ms", flush=True)
    print()
    for server, runs in results.items():
        print(f"{server:10} urgent p99 median {statistics.median(x['urgent']['p99_ms'] for x in runs):8.2f} ms"
              f"  1 ms path {statistics.median(x['bulk']['rps'] for x in runs):>6,.0f} req/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"conns": a.conns, "duration": a.duration, "priority": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
