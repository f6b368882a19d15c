"""The 2x overload scenario of issue 14, open loop: the priority path's p99.

    flock /tmp/qstack-bench.lock .venv/bin/python bench/http_overload.py \\
        [--rounds 3] [--duration 10] [--load 2.0] [--servers qstack,granian,gunicorn,uvicorn]
        [--bulk-conns 800] [--urgent-conns 50] [--json FILE]

Each server runs alone on CPU 0 serving bench/http_apps.py:prio (uvicorn:
its ASGI twin prio_asgi): ``/api/urgent`` answers at once, any other path
computes for 1 ms first.  qstack runs with ``--priority path=/api/urgent``
(``qstack-off``: the same server with one level, no rule); the peers have
no priority.

First the server's capacity C for the 1 ms path is measured with wrk
(closed loop, 3 s, ``--bulk-conns`` connections).  Then the open-loop
client below, on CPU 1, offers ``--load`` x C requests/s in all for
``--duration`` seconds: request i is due at i / rate, every 20th one (5%)
goes to /api/urgent, the others to /work.  Its latency counts from when it
was due, not from when it could be written (no coordinated omission, as
wrk2 or ``qstack load --rate``); the latency from the actual write is
reported too (``from_write``: without the client's own lateness, which a
busy client on a shared CPU adds).  Connections are opened before the clock
starts: ``--urgent-conns`` for the urgent requests and ``--bulk-conns``
for the rest, one request at a time on each (no pipelining: a reply in
order behind a slow one would measure head-of-line blocking, not the
server's scheduling); a request whose class has no idle connection waits
in the client until one is free, and that wait counts in its latency.
So at 2x the server always has about --bulk-conns slow requests queued,
and an urgent request arrives whenever it is due.

Bounded: at most rate x duration requests, and the run ends at most
``--grace`` seconds after the last one was due; requests unanswered then
count as ``unanswered`` (their latency is not in the percentiles: that
would hide them; the count says it).  Percentiles are exact (sorted).
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from http_wsgi import BIN, REPO, free_port, stop_group, wait_http, wrk  # noqa: E402

URGENT_EVERY = 20       # 5% of the requests
# uvloop's loop.time() is libuv's cached millisecond clock (read once per
# loop turn): far too coarse here.  Every stamp is perf_counter's.
clock = time.perf_counter


def command(server, port):
    if server == "uvicorn":
        return [os.path.join(BIN, "uvicorn"), "--loop", "uvloop", "--http", "httptools",
                "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning", "--no-access-log", "bench.http_apps:prio_asgi"]
    from http_wsgi import command as wsgi_command
    return wsgi_command(server, "prio", port)


# -- the open-loop client (runs in a child process pinned to CPU 1) ----------

async def _conn(port):
    return await asyncio.open_connection("127.0.0.1", port)


async def _exchange(reader, writer, req):
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            n = int(line[15:])
    if n:
        await reader.readexactly(n)
    return head[9:12]


async def _client(port, rate, duration, bulk_conns, urgent_conns, grace):
    urgent_req = b"GET /api/urgent HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    bulk_req = b"GET /work HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    queues = {True: asyncio.Queue(), False: asyncio.Queue()}
    lat = {True: [], False: []}
    wlat = {True: [], False: []}        # from the write instead (the server's share)
    errors = [0]
    conns = {True: [await _conn(port) for _ in range(urgent_conns)],
             False: [await _conn(port) for _ in range(bulk_conns)]}

    async def worker(urgent, rw):
        reader, writer = rw
        q, req, out, wout = (queues[urgent], urgent_req if urgent else bulk_req, lat[urgent],
                             wlat[urgent])
        while True:
            due = await q.get()
            if due is None:
                return
            t_write = clock()
            try:
                status = await _exchange(reader, writer, req)
            except (OSError, asyncio.IncompleteReadError):
                errors[0] += 1
                return
            if status != b"200":
                errors[0] += 1
            now = clock()
            out.append(now - due)
            wout.append(now - t_write)

    tasks = [asyncio.ensure_future(worker(u, rw)) for u in (True, False) for rw in conns[u]]
    total = int(rate * duration)
    t0 = clock() + 0.1
    sent = {True: 0, False: 0}
    for i in range(total):
        due = t0 + i / rate
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        urgent = i % URGENT_EVERY == 0
        queues[urgent].put_nowait(due)
        sent[urgent] += 1
    for u in (True, False):
        for _ in conns[u]:
            queues[u].put_nowait(None)
    await asyncio.wait(tasks, timeout=grace)
    for t in tasks:
        t.cancel()
    for u in (True, False):
        for _, w in conns[u]:
            w.close()

    def pct(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(len(xs) * p))] * 1e3 if xs else None

    return {"offered_per_s": rate, "seconds": duration, "errors": errors[0],
            **{name: {"sent": sent[u], "answered": len(lat[u]),
                      "unanswered": sent[u] - len(lat[u]),
                      "p50_ms": pct(lat[u], 0.50), "p99_ms": pct(lat[u], 0.99),
                      "max_ms": pct(lat[u], 1.0),
                      "from_write_p50_ms": pct(wlat[u], 0.50),
                      "from_write_p99_ms": pct(wlat[u], 0.99)}
               for name, u in (("urgent", True), ("bulk", False))}}


def client_main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--bulk-conns", type=int, required=True)
    ap.add_argument("--urgent-conns", type=int, required=True)
    ap.add_argument("--grace", type=float, required=True)
    a = ap.parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    res = asyncio.run(_client(a.port, a.rate, a.duration, a.bulk_conns, a.urgent_conns,
                              a.grace))
    print(json.dumps(res))


# -- the driver ----------------------------------------------------------------

def run(server, a):
    port = free_port()
    proc = subprocess.Popen(["taskset", "-c", "0"] + command(server, port), cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(port, proc)
        cap = wrk(port, a.bulk_conns, 3, "/work")["rps"]
        time.sleep(1)           # let the queue of the calibration drain
        rate = a.load * cap
        out = subprocess.run(
            ["taskset", "-c", "1", sys.executable, os.path.abspath(__file__), "--client",
             "--port", str(port), "--rate", f"{rate:.1f}", "--duration", str(a.duration),
             "--bulk-conns", str(a.bulk_conns), "--urgent-conns", str(a.urgent_conns),
             "--grace", str(a.grace)],
            capture_output=True, text=True, timeout=a.duration + a.grace + 120)
        if out.returncode:
            raise RuntimeError(f"client failed: {out.stderr.strip()[-500:]}")
        res = json.loads(out.stdout)
        res["capacity_per_s"] = cap
        return res
    finally:
        stop_group(proc)


def main():
    if sys.argv[1:2] == ["--client"]:
        return client_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--load", type=float, default=2.0, help="offered / measured capacity")
    ap.add_argument("--servers", default="qstack,qstack-off,granian,gunicorn,uvicorn")
    ap.add_argument("--bulk-conns", type=int, default=800)
    ap.add_argument("--urgent-conns", type=int, default=50)
    ap.add_argument("--grace", type=float, default=15)
    ap.add_argument("--json")
    a = ap.parse_args()
    for name, v in (("--rounds", a.rounds), ("--duration", a.duration), ("--load", a.load),
                    ("--bulk-conns", a.bulk_conns), ("--urgent-conns", a.urgent_conns)):
        if not v > 0:
            print(f"bench/http_overload.py: error: {name} must be positive", file=sys.stderr)
            sys.exit(2)
    servers = a.servers.split(",")
    for s in servers:
        if not s.startswith("qstack") and not os.path.exists(os.path.join(BIN, s)):
            print(f"bench/http_overload.py: error: {s} is not installed in this venv "
                  f"(pip install -e '.[bench]')", file=sys.stderr)
            sys.exit(2)
    results = {}
    for r in range(a.rounds):
        for server in servers:
            res = run(server, a)
            results.setdefault(server, []).append(res)
            u, b = res["urgent"], res["bulk"]
            print(f"round {r + 1} {server:10} capacity {res['capacity_per_s']:>6,.0f}/s "
                  f"offered {res['offered_per_s']:>6,.0f}/s | urgent p50 {u['p50_ms']:8.2f} "
                  f"p99 {u['p99_ms']:8.2f} ms (from the write {u['from_write_p99_ms']:8.2f}) "
                  f"({u['answered']}/{u['sent']}) | 1 ms path "
                  f"p99 {b['p99_ms']:8.1f} ms ({b['answered']}/{b['sent']}) "
                  f"errors {res['errors']}", flush=True)
    print()
    for server, runs in results.items():
        p99 = statistics.median(x["urgent"]["p99_ms"] for x in runs)
        print(f"{server:10} urgent p99 median {p99:8.2f} ms  (rounds: "
              + ", ".join(f"{x['urgent']['p99_ms']:.2f}" for x in runs) + ")")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
