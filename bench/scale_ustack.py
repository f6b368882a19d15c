"""Scale on qstack's own TCP/IP stack at both ends: a million connections
held and served on one machine, as QStack's server on QStack and MCC on mTCP.

    .venv/bin/python bench/scale.py --backend ustack [--connections 1000000]
        [--ips K] [--setup 2] [--wait 10] [--epoch 60] [--burst 5000]
        [--ratio 0.05] [--warmup 2] [--duration 20] [--plot docs/scale-ustack.png]
        [--json FILE] [--quick] [--cores N] [--app echo|iotep] [--redis R]

End to end (``--app iotep``: apps.iotepserver as conf/iotepserver.yaml ships
it, on --redis redis-servers started for the run, against ``qstack load
--protocol iotep``; only its requests have replies, hence latencies):

1. ``qstack serve apps.echo:handle --backend ustack --driver memif`` pinned
   to --server-cpu: the server's stack on DPDK's net_memif, shared memory,
   no kernel network and no file per connection.
2. ``qstack load --backend ustack --driver memif`` on the client side of the
   same memif link, pinned to --client-cpu: qstack's own TCP client, owning
   --ips addresses of 198.18.0.0/15 (64,512 ports each), opening every
   connection as fast as the pacing over --setup lets it, then --wait idle
   seconds, then MCC's schedule (every connection once per --epoch, in
   bursts of --burst, --ratio of them high priority) for --warmup + --duration
   seconds; the --duration window is what the latency figures cover.
3. Samples both processes' RSS twice a second and the load generator's
   "connected" count every second; the memory per held connection is the
   RSS with every connection up and idle (just before the first message)
   minus the RSS before the first connection, over the connections.
4. Writes the report, the JSON and a picture (connections and RSS against
   time).

``--cores N``: the server runs N cores, one memif link each (socket
PATH.kofN), and the load generator N processes (``--smp N``), process k
on link k; both are then left on every CPU (the server pins its own
cores) instead of --server-cpu / --client-cpu, and RSS is summed over
each side's processes.

Needs root (EAL) and a build with DPDK; it says so otherwise.  Long: wrap it
in ``flock /tmp/qstack-bench.lock`` on a shared machine.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import harness as h

sys.path.insert(0, h.REPO)
from qstack import memif  # noqa: E402

RESULTS = os.path.join(h.BENCH, "results")
SERVER_IP, CLIENT_IP = "198.18.0.2", "198.18.1.1"
PORTS_PER_ADDRESS = 64_512           # 1024..65535, what the client takes per address


def rss(pid):
    """Resident bytes of pid's process tree."""
    total = 0
    for p in h.process_tree(pid):
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Sampler(threading.Thread):
    def __init__(self, server, load, every=0.5):
        super().__init__(daemon=True)
        self.server, self.load, self.every = server, load, every
        self.samples, self.stop_evt = [], threading.Event()
        self.conns = 0                   # the load generator's last "connected" figure

    def run(self):
        while not self.stop_evt.is_set():
            self.samples.append({"t": time.monotonic(), "server_rss": rss(self.server),
                                 "load_rss": rss(self.load), "conns": self.conns})
            self.stop_evt.wait(self.every)


def run(args):
    if not os.path.exists(os.path.join(h.REPO, "qstack", "_qsdpdk.so")):
        sys.exit("scale --backend ustack: this build has no DPDK (install libdpdk-dev and "
                 "pkg-config, then make)")
    os.makedirs(os.path.join(RESULTS, "logs"), exist_ok=True)
    py = h.VENV_PY if os.access(h.VENV_PY, os.X_OK) else sys.executable
    tmp = tempfile.mkdtemp(prefix="qstack-scale-")
    sock = os.path.join(tmp, "qs.memif")
    log_path = os.path.join(RESULTS, "logs", "scale-ustack-server.log")
    doc_path = os.path.join(RESULTS, "scale-ustack-load.json")
    conf = os.path.join(tmp, "serve.yaml")       # the flow table: every connection, and room
    flows = max(1 << 20, args.connections + 65536)
    redis_dir = None
    if args.app == "iotep":
        # apps.iotepserver as shipped (conf/iotepserver.yaml), on Redis
        import yaml
        redis_dir = os.path.join(tmp, "redis")
        subprocess.run([py, "-m", "qstack", "redis", "up", str(args.redis), "--dir", redis_dir],
                       cwd=h.REPO, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(h.REPO, "conf", "iotepserver.yaml")) as f:
            cfg = yaml.safe_load(f)
        cfg["app"]["settings"].update(redis_dir=redis_dir, redis_count=args.redis)
        cfg.setdefault("ustack", {})["max_concurrency"] = flows
        with open(conf, "w") as f:
            yaml.safe_dump(cfg, f)
        app = []
    else:
        with open(conf, "w") as f:
            f.write("ustack:\n  max_concurrency: %d\n" % flows)
        app = ["apps.echo:handle", "--framing", "fixed:64", "--priority", "offset=5,value=0x01"]
    serve = [py, "-m", "qstack", "serve", *app, "--config", conf,
             "--backend", "ustack",
             "--driver", "memif", "--memif", sock, "--ip", SERVER_IP + "/15", "--port", "7",
             "--cores", str(args.cores)]
    server_cpu, client_cpu = args.server_cpu, args.client_cpu
    if args.cores > 1:               # one link per core: both sides on every CPU
        server_cpu = client_cpu = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    print("server: taskset -c %s %s" % (server_cpu, " ".join(serve[1:])), flush=True)
    server = h.Server("qstack", serve, server_cpu, log_path=log_path)
    load_proc = sampler = None
    out = {"args": vars(args)}
    try:
        deadline = time.monotonic() + 60
        while not memif.served_links(sock):
            if not server.alive() or time.monotonic() > deadline:
                raise RuntimeError("qstack serve did not come up:\n" + server.log_tail())
            time.sleep(0.1)
        time.sleep(1)
        idle = rss(server.pid)
        load = [py, "-m", "qstack", "load", "--backend", "ustack", "--driver", "memif",
                "--memif", sock, "--ip", CLIENT_IP + "/15",
                "--ips", str(args.ips), "--dest", "%s:7" % SERVER_IP,
                "-c", str(args.connections), "-s", str(args.setup), "-w", str(args.wait),
                "-e", str(args.epoch), "-b", str(args.burst), "-r", str(args.ratio),
                *(["--protocol", "iotep"] if args.app == "iotep" else ["-l", "64"]),
                "--warmup", str(args.warmup), "-d", str(args.duration), "--log-duration", "0",
                "--marks", "--json", doc_path, "--smp", str(args.cores)]
        print("load:   taskset -c %s %s" % (client_cpu, " ".join(load[1:])), flush=True)
        t0 = time.monotonic()
        load_proc = subprocess.Popen(h.pin_prefix(client_cpu) + load, cwd=h.REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        sampler = Sampler(server.pid, load_proc.pid)
        sampler.start()
        marks, progress, held, tail = {}, [], None, []
        limit = args.setup + args.wait + args.warmup + args.duration + 120
        killer = threading.Timer(limit, load_proc.kill)
        killer.start()
        try:
            for line in load_proc.stdout:
                tail = (tail + [line])[-40:]
                m = re.match(r"\[\s*(\d+)s\] connected ([\d,]+)", line)
                if m:
                    n = int(m.group(2).replace(",", ""))
                    progress.append((time.monotonic() - t0, n))
                    sampler.conns = n
                elif line.startswith("#start"):
                    marks["start"] = time.monotonic() - t0
                    # every connection up and idle: the last samples before the
                    # first message (sending starts --warmup before #start)
                    pre = [s for s in sampler.samples
                           if s["t"] - t0 < marks["start"] - args.warmup - 0.3]
                    held = pre[-1] if pre else None
                elif line.startswith("#end"):
                    marks["end"] = time.monotonic() - t0
            load_proc.wait()
        finally:
            killer.cancel()
        sampler.stop_evt.set()
        sampler.join()
    finally:
        if sampler is not None:
            sampler.stop_evt.set()
        if load_proc is not None and load_proc.poll() is None:
            load_proc.kill()
            load_proc.wait()
        code = server.stop(timeout=20)
        if redis_dir:
            subprocess.run([py, "-m", "qstack", "redis", "down", "--dir", redis_dir],
                           cwd=h.REPO, stdout=subprocess.DEVNULL)
    try:
        with open(doc_path) as f:
            loaddoc = json.load(f)
    except (OSError, ValueError):
        loaddoc = None
    samples = [dict(s, t=s["t"] - t0) for s in sampler.samples]
    out.update(idle_server_rss=idle, held=held and dict(held, t=held["t"] - t0),
               samples=samples, progress=progress, marks=marks, server_exit=code,
               load_exit=load_proc.returncode, load_tail="".join(tail)[-3000:], load=loaddoc,
               server_log=server.log_tail(4))
    return out


def setup_rate(progress, n):
    """(seconds from the first connection until all n were up, the best
    one-second rate) from the load generator's progress lines."""
    if not progress:
        return None, None
    best = max((b[1] - a[1]) / (b[0] - a[0]) for a, b in zip([(0.0, 0)] + progress, progress))
    full = next((t for t, c in progress if c >= n), None)
    return full, best


def report(res, args):
    doc, held = res["load"] or {}, res["held"]
    conn, win = doc.get("connections", {}), doc.get("window", {})
    n = conn.get("connected", 0)
    lines = ["target %s connections: %s connected at the end (max %s), %s attempts, "
             "%s retries (%s), %s drops; server exit %s, load exit %s, load status %s" % (
                 "{:,}".format(args.connections), "{:,}".format(n),
                 "{:,}".format(conn.get("max_connected", 0)),
                 "{:,}".format(conn.get("attempts", 0)), "{:,}".format(conn.get("retries", 0)),
                 ", ".join("%s %d" % kv for kv in conn.get("errors", {}).items() if kv[1])
                 or "none", "{:,}".format(conn.get("drops", 0)), res["server_exit"],
                 res["load_exit"], doc.get("status"))]
    full, best = setup_rate(res["progress"], args.connections)
    if full:
        lines.append("connection setup: all up %.1f s after the load generator started "
                     "(%s/s on average, pacing over --setup %.0f s); best second %s/s" % (
                         full, "{:,.0f}".format(args.connections / full), args.setup,
                         "{:,.0f}".format(best)))
    if held and held["conns"]:
        k = held["conns"]
        lines += ["", "memory per held connection (%s connections up and idle):" %
                  "{:,}".format(k), "| process | RSS idle | RSS held | per connection |",
                  "|---|---|---|---|",
                  "| server (`qstack serve`, ustack on memif%s) | %.0f MB | %.0f MB | **%s B** |" % (
                      ", %d cores" % args.cores if args.cores > 1 else "",
                      res["idle_server_rss"] / 1e6, held["server_rss"] / 1e6,
                      "{:,.0f}".format((held["server_rss"] - res["idle_server_rss"]) / k)),
                  "| client (`qstack load`, ustack on memif%s) | - | %.0f MB | **%s B** (all of "
                  "its RSS) |" % (", %d processes" % args.cores if args.cores > 1 else "",
                                  held["load_rss"] / 1e6,
                                  "{:,.0f}".format(held["load_rss"] / k))]
    lat = doc.get("latency_ms", {})
    if lat:
        lines += ["", "the %.0f s window (after %.0f s of warm-up): %s msg/s offered, %s "
                  "replies/s, incomplete %s" % (args.duration, args.warmup,
                                                "{:,.0f}".format(win.get("offered_per_s") or 0),
                                                "{:,.0f}".format(win.get("responses_per_s") or 0),
                                                win.get("incomplete")),
                  "| priority | timed from | count | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |",
                  "|---|---|---|---|---|---|---|---|"]
        written = doc.get("latency_from_write_ms") or {}
        for level in ("high", "low"):
            for origin, table in (("the schedule", lat), ("its write", written)):
                d = table.get(level)
                if not d:
                    continue
                lines.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                    level, origin, "{:,}".format(d.get("count", 0)),
                    *(_f(d.get(p)) for p in ("p50", "p90", "p99", "p99.9", "max"))))
        lines.append("(from the schedule: from the burst's start, the client's time to "
                     "write the burst included (at worst %s ms behind); from its write: "
                     "what a monitor on the wire sees, as QStack's HCMonitor)" %
                     _f(doc.get("messages", {}).get("max_lag_ms")))
    m = doc.get("messages", {})
    if m:
        lines.append("messages: sent %s, responses %s, lost %s, bad replies %s" % (
            "{:,}".format(m.get("sent", 0)), "{:,}".format(m.get("responses", 0)),
            m.get("lost"), m.get("bad_replies")))
    text = "\n".join(lines)
    print("\n" + text)
    return text


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = res["samples"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot([x["t"] for x in s], [x["conns"] / 1e6 for x in s], color="tab:blue",
            label="connections (millions)")
    ax.set_xlabel("seconds since the load generator started")
    ax.set_ylabel("connections (millions)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot([x["t"] for x in s], [x["server_rss"] / 1e9 for x in s], color="tab:red",
             label="server RSS")
    ax2.plot([x["t"] for x in s], [x["load_rss"] / 1e9 for x in s], color="tab:orange",
             label="client RSS")
    ax2.set_ylabel("RSS (GB)")
    for what, t in res["marks"].items():
        ax.axvline(t, color="grey", lw=0.8, ls=":")
        ax.text(t, 0.02, " window " + what, rotation=90, fontsize=7, color="grey")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    ax.set_title("qstack serve and qstack load, both on ustack over memif")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote %s" % os.path.relpath(path, h.REPO))


def _f(v):
    return "-" if v is None else "%.2f" % v


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["ustack"], default="ustack")
    ap.add_argument("--app", choices=["echo", "iotep"], default="echo",
                    help="the server: apps.echo, or apps.iotepserver on --redis redis-servers")
    ap.add_argument("--redis", type=int, default=4, help="redis-servers for --app iotep")
    ap.add_argument("--connections", "-c", type=int, default=1_000_000)
    ap.add_argument("--ips", type=int, default=0,
                    help="client addresses (default: enough for the ports, +1)")
    ap.add_argument("--setup", type=float, default=2.0, help="pace the connects over S s")
    ap.add_argument("--wait", type=float, default=10.0,
                    help="idle seconds after the paced setup: connects that time out at "
                         "first are retried, and all must be up before the first message")
    ap.add_argument("--epoch", type=float, default=60.0)
    ap.add_argument("--burst", type=int, default=5000)
    ap.add_argument("--ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--cores", type=int, default=1,
                    help="server cores, one memif link each, and as many load processes")
    ap.add_argument("--json", default=os.path.join(RESULTS, "scale-ustack.json"))
    ap.add_argument("--plot", default=None, help="write the picture here (PNG)")
    ap.add_argument("--quick", action="store_true", help="100,000 connections, short phases")
    args = ap.parse_args(argv)
    if args.quick:
        args.connections, args.epoch, args.burst, args.duration = 100_000, 10.0, 1000, 5.0
    args.ips = args.ips or math.ceil(args.connections / PORTS_PER_ADDRESS) + 1
    return args


def main(argv):
    args = parse_args(argv)
    started = time.monotonic()
    res = run(args)
    res["report"] = report(res, args)
    res["elapsed_s"] = time.monotonic() - started
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote %s (%.0f s)" % (os.path.relpath(args.json, h.REPO), res["elapsed_s"]))
    if args.plot:
        plot(res, args.plot)
