"""`qstack load` on the entries of the transport table: kernel sockets
(epoll, io_uring), and qstack's own TCP client (ustack) against `qstack
serve --backend ustack`.

    .venv/bin/python bench/load_backends.py [--rounds 3] [--conns 100] [--duration 5]
        [--hold 20000,60000] [--json FILE]

Runs as root: a network namespace (qst-*) with two TAP devices on one
bridge (tests/netns.py BridgedTaps): the server's stack is 198.18.0.2 on
qst-s, the client's 198.18.1.1 on qst-c; nothing leaves the namespace.

1. Echo, closed loop, 64-byte messages, --conns connections, server on
   CPU 0 and the client on CPU 1, --rounds rounds each, in turn:
     kernel   qstack serve (kernel backend) on 127.0.0.1, qstack load on
              kernel sockets (loopback)
     uring    qstack serve --backend uring on 127.0.0.1, qstack load
              --backend uring: both ends on io_uring (loopback)
     ustack   qstack serve --backend ustack on qst-s, qstack load
              --backend ustack on qst-c: both ends on qstack's own TCP, every
              frame through /dev/net/tun and the kernel's bridge
     memif    the same two ends joined by DPDK's net_memif instead (shared
              memory, no kernel at all; a fresh server per round, as a memif
              server takes one client link at a time)
     memif2   the memif pair on both CPUs: qstack serve --cores 2 (one memif
              link per core, each core pinned by the server's layout) and
              qstack load --smp 2 (process k on link k), no taskset
   Prints req/s, p50/p99, the client's CPU per request, and each pair's
   median req/s as a ratio to the kernel pair's.

2. The ustack client's memory per connection: the load process's peak RSS
   holding each count of --hold connections (one request each per 10 s
   epoch), and the slope between the counts (the packet pool, allocated up
   front, cancels out).

Wrap it in ``flock /tmp/qstack-bench.lock`` on a shared machine.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
PY = sys.executable
SERVER, CLIENT = "198.18.0.2", "198.18.1.1"
USTACK_CLIENT = ["--backend", "ustack", "--tap", "qst-c", "--ip", CLIENT + "/16"]


def memif_sock():
    return f"/tmp/qst-memif-{os.getpid()}.sock"


def start_server(backend, port):
    memif_srv = ["--backend", "ustack", "--driver", "memif", "--memif", memif_sock(),
                 "--ip", SERVER + "/16"]
    where = {"kernel": ["--host", "127.0.0.1"],
             "uring": ["--host", "127.0.0.1", "--backend", "uring"],
             "ustack": ["--backend", "ustack", "--tap", "qst-s", "--ip", SERVER + "/16"],
             "memif": memif_srv, "memif2": memif_srv + ["--cores", "2"]}[backend]
    pin = [] if backend == "memif2" else ["taskset", "-c", "0"]
    p = subprocess.Popen([*pin, PY, "-m", "qstack", "serve", "apps.echo:handle",
                          "--framing", "fixed:64", "--port", str(port), *where], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    host = "127.0.0.1" if backend in ("kernel", "uring") else SERVER
    import socket
    deadline = time.monotonic() + 20
    if backend.startswith("memif"):  # no kernel path to it: wait for its socket(s)
        from qstack import memif
        while time.monotonic() < deadline:
            if memif.served_links(memif_sock()):
                return p, host
            time.sleep(0.1)
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return p, host
        except OSError:
            time.sleep(0.1)
    p.kill()
    raise RuntimeError(f"{backend} server did not come up: {p.stderr.read().decode()[-500:]}")


def stop(p):
    p.terminate()
    try:
        p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def echo_round(backend, host, port, conns, duration):
    memif_cl = ["--backend", "ustack", "--driver", "memif", "--memif", memif_sock(),
                "--ip", CLIENT + "/16"]
    client = {"kernel": [], "uring": ["--backend", "uring"], "ustack": USTACK_CLIENT,
              "memif": memif_cl,
              "memif2": memif_cl + ["--smp", "2"]}[backend]
    pin = [] if backend == "memif2" else ["taskset", "-c", "1"]
    out = subprocess.run([*pin, PY, "-m", "qstack", "load", *client, "--dest",
                          f"{host}:{port}", "--closed", "-c", str(conns), "-l", "64", "-s", "0.5",
                          "-w", "0.5", "-d", str(duration), "--json", "-", "-q"], cwd=REPO,
                         capture_output=True, text=True, timeout=duration + 60)
    d = json.loads(out.stdout)
    rps = d["window"]["responses_per_s"]
    lat = d["latency_ms"]["all"]
    cpu = d["client"]["cpu"]
    return {"status": d["status"], "rps": rps, "p50_ms": lat["p50"], "p99_ms": lat["p99"],
            "client_cores": cpu, "client_us_per_req": cpu / rps * 1e6 if rps else None}


def hold_rss(host, port, n):
    """Peak RSS (bytes) of a ustack load process holding n connections."""
    import tempfile
    ips = str(-(-n // 60000))
    doc = tempfile.NamedTemporaryFile(suffix=".json")
    # the report goes to a file: a pipe nobody reads until the end would fill
    p = subprocess.Popen([PY, "-m", "qstack", "load", *USTACK_CLIENT, "--ips", ips, "--dest",
                          f"{host}:{port}", "-c", str(n), "-s", "3", "-w", "1", "-e", "10",
                          "-b", "1000", "-d", "4", "--json", doc.name, "-q"], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            peak = max(peak, rss * 1024)
        except (OSError, StopIteration):
            pass
        time.sleep(0.2)
    with open(doc.name) as f:
        d = json.load(f)
    doc.close()
    assert d["connections"]["max_connected"] == n, d["connections"]
    return peak


def show(r, b, row):
    print(f"round {r + 1} {b:6s} {row['rps']:10,.0f} req/s  p50 {row['p50_ms']:.3f} ms  "
          f"p99 {row['p99_ms']:.3f} ms  client {row['client_us_per_req']:.2f} us/req  "
          f"{row['status']}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=100)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--hold", default="20000,60000")
    ap.add_argument("--json")
    a = ap.parse_args()
    from netns import BridgedTaps
    memif_ok = os.path.exists(os.path.join(REPO, "qstack", "_qsdpdk.so"))
    if not memif_ok:
        print("no DPDK in this build: the memif pair is left out")
    net = BridgedTaps()
    pairs = ("kernel", "uring", "ustack")
    result = {"echo": {b: [] for b in (*pairs, "memif", "memif2")}, "hold": {}}
    try:
        with net.entered():
            servers = {b: start_server(b, 7100 + i) + (7100 + i,)
                       for i, b in enumerate(pairs)}
            try:
                for r in range(a.rounds):
                    for b in pairs:
                        _, host, port = servers[b]
                        row = echo_round(b, host, port, a.conns, a.duration)
                        result["echo"][b].append(row)
                        show(r, b, row)
                    for b in ("memif", "memif2") if memif_ok else ():
                        mp, host, port = start_server(b, 7103) + (7103,)
                        try:
                            row = echo_round(b, host, port, a.conns, a.duration)
                        finally:
                            stop(mp)
                        result["echo"][b].append(row)
                        show(r, b, row)
                _, host, port = servers["ustack"]
                counts = [int(x) for x in a.hold.split(",") if x]
                for n in counts:
                    result["hold"][n] = hold_rss(host, port, n)
                    print(f"ustack client holding {n:,} connections: peak RSS "
                          f"{result['hold'][n] / 2**20:.1f} MiB", flush=True)
                if len(counts) >= 2:
                    lo, hi = counts[0], counts[-1]
                    per = (result["hold"][hi] - result["hold"][lo]) / (hi - lo)
                    result["bytes_per_conn"] = per
                    print(f"ustack client: {per:,.0f} B per connection ({lo:,} -> {hi:,})")
            finally:
                for p, _, _ in servers.values():
                    stop(p)
    finally:
        net.close()
    med = {}
    for b in (*pairs, "memif", "memif2"):
        rows = sorted(x["rps"] for x in result["echo"][b])
        if rows:
            med[b] = rows[len(rows) // 2]
            ratio = f"  {med[b] / med['kernel']:.2f}x the kernel pair" if "kernel" in med else ""
            print(f"{b:6s} median {med[b]:,.0f} req/s (of {len(rows)}){ratio}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
