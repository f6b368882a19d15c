"""Scale: hold 100,000 concurrent connections with the kernel backend, and
measure what each one costs.  (``--backend ustack``: a million, with both
ends on qstack's own stack over memif; bench/scale_ustack.py.)

    .venv/bin/python bench/scale.py [--connections 100000] [--cores 7] [--smp 7]
        [--ips 8] [--setup 40] [--wait 10] [--epoch 10] [--burst 1000]
        [--duration 30] [--json FILE] [--quick]
    .venv/bin/python bench/scale.py --report bench/results/scale.json

What it does, end to end:

1. Samples the machine before anything starts: /proc/meminfo (Slab,
   SReclaimable, SUnreclaim), /proc/slabinfo (bytes per cache) and
   /proc/net/sockstat (TCP sockets and their buffer pages).
2. Starts ``qstack serve apps.echo:handle --framing fixed:64 --priority
   offset=5,value=0x01 --cores N --stats`` pinned to --server-cpu: N core
   processes share the port with SO_REUSEPORT, each holding its own
   connections under the 20,000 open files a process may have here (the
   kernel spreads connections by hash, so each core gets about c/N, not
   exactly; the default N keeps the average at or under 15,000).
3. Runs ``qstack load`` pinned to --client-cpu: --smp processes (each under
   20,000 files too), --ips source addresses in 127.0.0.0/8 (one address has
   only 28,232 ephemeral ports towards one server port), connects paced
   evenly over --setup seconds, then --wait idle seconds, then every
   connection sends one 64-byte message per --epoch, the connections firing
   in bursts of --burst (MCC's schedule), for --duration measured seconds.
4. Samples every second: the server's RSS (sum over the core processes, and
   the supervisor apart), the load processes' RSS, the kernel figures above,
   and the connections each core holds (from its --stats line).
5. Stops the load generator and the server (SIGTERM, then SIGKILL of the
   process group) and samples once more.

Memory per held connection, from two points: the server idle before any
connection, and the last sample of the idle --wait phase with every
connection up (so the figures are the connections' own, not the buffers of
messages in flight); the same during the sending window is shown too.
Kernel slab counts both ends of every connection (client and server sockets
are both on this machine's loopback): per connection is the pair, and the
per-cache table says which objects it is made of.

Everything it starts is stopped when it ends, also on Ctrl-C.  Long: wrap it
in ``flock /tmp/qstack-bench.lock`` on a shared machine.
"""
import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import harness as h

RESULTS = os.path.join(h.BENCH, "results")
FILE_LIMIT = 20_000
PER_PROCESS = 15_000          # default average per process: room for SO_REUSEPORT skew


# ---- /proc readers ---------------------------------------------------------------

def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def meminfo():
    out = {}
    for line in read("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        if key in ("Slab", "SReclaimable", "SUnreclaim", "MemFree", "MemAvailable"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def slabinfo():
    """{cache: bytes} (active objects x object size) from /proc/slabinfo."""
    out = {}
    for line in read("/proc/slabinfo").splitlines()[2:]:
        f = line.split()
        if len(f) > 3:
            out[f[0]] = int(f[1]) * int(f[3])
    return out


def sockstat():
    out = {}
    for line in read("/proc/net/sockstat").splitlines():
        if line.startswith("TCP:"):
            f = line.split()[1:]
            d = dict(zip(f[::2], (int(v) for v in f[1::2])))
            out = {"tcp_inuse": d.get("inuse", 0), "tcp_tw": d.get("tw", 0),
                   "tcp_mem_bytes": d.get("mem", 0) * os.sysconf("SC_PAGE_SIZE")}
    return out


def rss(pid):
    for line in read("/proc/%d/status" % pid).splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def children(pid):
    return [p for p in h.process_tree(pid) if p != pid]


# ---- the run -------------------------------------------------------------------------

class Sampler(threading.Thread):
    """Samples memory and connection counts every `every` seconds."""

    def __init__(self, server, load_proc, log_path, every=1.0):
        super().__init__(daemon=True)
        self.server, self.load_proc, self.log_path, self.every = server, load_proc, log_path, every
        self.samples = []
        self.stop_evt = threading.Event()

    def core_conns(self):
        """{core: conns} from the last --stats block in the server's log."""
        conns = {}
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - 16384))
                tail = f.read().decode(errors="replace")
        except OSError:
            return conns
        for m in re.finditer(r"^core (\d+)\s+conns (\d+)", tail, re.M):
            conns[int(m.group(1))] = int(m.group(2))
        return conns

    def sample(self):
        cores = children(self.server.pid)
        load = h.process_tree(self.load_proc.pid) if self.load_proc else []
        s = {"t": time.monotonic(),
             "server_rss": sum(rss(p) for p in cores),
             "server_procs": len(cores),
             "supervisor_rss": rss(self.server.pid),
             "load_rss": sum(rss(p) for p in load),
             "core_conns": self.core_conns(),
             **meminfo(), **sockstat()}
        s["conns"] = sum(s["core_conns"].values())
        return s

    def run(self):
        while not self.stop_evt.is_set():
            self.samples.append(self.sample())
            self.stop_evt.wait(self.every)


def snapshot():
    return {"t": time.monotonic(), **meminfo(), **sockstat(), "slab": slabinfo()}


def per_conn(a, b, n):
    return None if not n else (b - a) / n


def run(args):
    os.makedirs(os.path.join(RESULTS, "logs"), exist_ok=True)
    log_path = os.path.join(RESULTS, "logs", "scale-server.log")
    doc_path = os.path.join(RESULTS, "scale-load.json")
    py = h.VENV_PY if os.access(h.VENV_PY, os.X_OK) else sys.executable
    port = h.free_port()
    out = {"args": vars(args), "port": port}

    base = snapshot()
    serve = [py, "-m", "qstack", "serve", "apps.echo:handle", "--host", h.LOOPBACK,
             "--port", str(port), "--cores", str(args.cores), "--framing", "fixed:64",
             "--priority", "offset=5,value=0x01", "--stats", "--log-level", "warning"]
    print("server: taskset -c %d %s" % (args.server_cpu, " ".join(serve[1:])), flush=True)
    server = h.Server("qstack", serve, args.server_cpu, log_path=log_path)
    load_proc = None
    sampler = None
    try:
        why = server.wait_port(port, timeout=30)
        if why:
            raise RuntimeError("qstack serve %s:\n%s" % (why, server.log_tail()))
        # every core up: the supervisor's children, each with its stats line
        deadline = time.monotonic() + 20
        probe = Sampler(server, None, log_path)
        while time.monotonic() < deadline and len(probe.core_conns()) < args.cores:
            time.sleep(0.5)
        time.sleep(2)
        idle = probe.sample()
        idle["slab"] = slabinfo()
        print("server idle: %d core processes, RSS %.1f MB (sum), supervisor %.1f MB" % (
            idle["server_procs"], idle["server_rss"] / 1e6, idle["supervisor_rss"] / 1e6),
            flush=True)

        load = [py, "-m", "qstack", "load", "--dest", "%s:%d" % (h.LOOPBACK, port),
                "-c", str(args.connections), "--smp", str(args.smp), "--ips", str(args.ips),
                "-s", str(args.setup), "-w", str(args.wait), "-e", str(args.epoch),
                "-b", str(args.burst), "-l", "64", "-r", str(args.ratio),
                "-d", str(args.duration), "--drain", "3", "--log-duration", "0",
                "--connect-inflight", str(args.connect_inflight), "--marks", "-q",
                "--json", doc_path]
        print("load:   taskset -c %d %s" % (args.client_cpu, " ".join(load[1:])), flush=True)
        t_launch = time.monotonic()
        load_proc = subprocess.Popen(h.pin_prefix(args.client_cpu) + load, cwd=h.REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        sampler = Sampler(server, load_proc, log_path)
        sampler.start()
        marks = {}
        limit = args.setup + args.wait + args.duration + 60
        timer = threading.Timer(limit, lambda: os.killpg(load_proc.pid, signal.SIGKILL))
        timer.start()
        held = None
        try:
            for line in load_proc.stdout:
                if line.startswith("#"):
                    what = line[1:].strip()
                    marks[what] = time.monotonic()
                    if what == "start" and sampler.samples:
                        # the last idle sample with everything connected: just
                        # before the first message (sending starts `warmup` = 0
                        # before the window)
                        pre = [s for s in sampler.samples if s["t"] < marks["start"] - 0.5]
                        held = max(pre[-3:], key=lambda s: s["conns"]) if pre else None
                        if held is not None:
                            held = dict(held, slab=slabinfo())   # slab read now: same state
            err = load_proc.stderr.read()
            load_proc.wait()
        finally:
            timer.cancel()
        loaded = [s for s in sampler.samples
                  if marks.get("start", 1e18) + 2 <= s["t"] <= marks.get("end", -1)]
        sampler.stop_evt.set()
        sampler.join()
        peak = max(sampler.samples, key=lambda s: s["conns"]) if sampler.samples else None
    finally:
        if sampler is not None:
            sampler.stop_evt.set()
        if load_proc is not None and load_proc.poll() is None:
            try:
                os.killpg(load_proc.pid, signal.SIGTERM)
                load_proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(load_proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        code = server.stop(timeout=20)
    time.sleep(3)
    after = snapshot()
    try:
        with open(doc_path) as f:
            loaddoc = json.load(f)
    except (OSError, ValueError):
        loaddoc = None
    out.update(base=base, idle=idle, held=held, peak=peak, after=after, marks=marks,
               t_launch=t_launch, server_exit=code, load_exit=load_proc.returncode,
               load_stderr=err[-3000:], samples=sampler.samples, load=loaddoc,
               loaded_median=_median_sample(loaded))
    return out


def _median_sample(samples):
    if not samples:
        return None
    keys = ("server_rss", "load_rss", "Slab", "SUnreclaim", "SReclaimable", "tcp_mem_bytes",
            "conns", "tcp_inuse")
    return {k: h.median([s.get(k) for s in samples]) for k in keys}


def report(res, args):
    lines = []
    base, idle, held, after = res["base"], res["idle"], res["held"], res["after"]
    doc = res["load"] or {}
    conn = doc.get("connections", {})
    lines.append("target %s connections: load generator max connected %s, connected at end %s; "
                 "server held %s at the last idle sample (per core: %s)" % (
                     "{:,}".format(args.connections),
                     "{:,}".format(conn.get("max_connected", 0)),
                     "{:,}".format(conn.get("connected", 0)),
                     "{:,}".format(held["conns"]) if held else "-",
                     ", ".join("{:,}".format(v) for _, v in sorted(held["core_conns"].items()))
                     if held else "-"))
    if conn:
        errs = {k: v for k, v in conn.get("errors", {}).items() if v}
        lines.append("connect attempts %s, retries %s, drops %s, errors %s" % (
            "{:,}".format(conn.get("attempts", 0)), "{:,}".format(conn.get("retries", 0)),
            "{:,}".format(conn.get("drops", 0)), errs or "none"))
    if held:
        n = held["conns"]
        rows = [
            ("server RSS (sum of %d cores)" % held["server_procs"],
             held["server_rss"] - idle["server_rss"]),
            ("kernel slab (Slab, both ends)", held["Slab"] - base["Slab"]),
            ("  of which SUnreclaim", held["SUnreclaim"] - base["SUnreclaim"]),
            ("  of which SReclaimable", held["SReclaimable"] - base["SReclaimable"]),
            ("TCP buffers (sockstat mem)", held["tcp_mem_bytes"] - base["tcp_mem_bytes"]),
            ("load generator RSS (%d processes)" % args.smp, held["load_rss"]),
        ]
        lines.append("")
        lines.append("memory per held connection (%s connections, idle, before the first "
                     "message):" % "{:,}".format(n))
        lines.append("| what | total | per connection |")
        lines.append("|---|---|---|")
        for what, total in rows:
            lines.append("| %s | %.1f MB | %s B |" % (what, total / 1e6,
                                                     "{:,.0f}".format(total / n) if n else "-"))
        lm = res.get("loaded_median")
        if lm and lm.get("conns"):
            lines.append("")
            lines.append("during the sending window (median of samples): server RSS %.1f MB "
                         "(+%s B per connection over idle), Slab +%s B per connection, TCP "
                         "buffers %.1f MB" % (
                             lm["server_rss"] / 1e6,
                             "{:,.0f}".format((lm["server_rss"] - idle["server_rss"]) / lm["conns"]),
                             "{:,.0f}".format((lm["Slab"] - base["Slab"]) / lm["conns"]),
                             lm["tcp_mem_bytes"] / 1e6))
        slab0, slab1 = base["slab"], held["slab"]
        deltas = sorted(((k, slab1.get(k, 0) - slab0.get(k, 0)) for k in set(slab0) | set(slab1)),
                        key=lambda kv: -kv[1])
        top = [(k, d) for k, d in deltas if d > 0][:12]
        if top:
            lines.append("")
            lines.append("slab caches grown (bytes per connection, both ends): " +
                         ", ".join("%s %s" % (k, "{:,.0f}".format(d / n)) for k, d in top))
        procfs = slab1.get("proc_inode_cache", 0) - slab0.get("proc_inode_cache", 0)
        if procfs > 0:
            lines.append("of which proc_inode_cache %s B per connection: procfs inodes of "
                         "/proc/PID/fd entries, made when something lists the processes' open "
                         "files (a monitor on this machine does, every few seconds: about one "
                         "696-byte inode per fd); not the connection's own state" % (
                             "{:,.0f}".format(procfs / n)))
            lines.append("kernel slab per connection without them: %s B (both ends, so about "
                         "%s B per socket)" % ("{:,.0f}".format((held["Slab"] - base["Slab"]
                                                                  - procfs) / n),
                                               "{:,.0f}".format((held["Slab"] - base["Slab"]
                                                                  - procfs) / n / 2)))
    if doc:
        lat = doc.get("latency_ms", {}).get("all", {})
        win = doc.get("window", {})
        lines.append("")
        lines.append("sending: %s msg/s offered, %s replies/s, latency p50 %s ms p99 %s ms "
                     "max %s ms, incomplete %s, status %s" % (
                         "{:,.0f}".format(win.get("offered_per_s") or 0),
                         "{:,.0f}".format(win.get("responses_per_s") or 0),
                         _f(lat.get("p50")), _f(lat.get("p99")), _f(lat.get("max")),
                         win.get("incomplete"), doc.get("status")))
        for p in doc.get("problems", []):
            lines.append("note: " + p)
    lines.append("after stopping: Slab %+.1f MB vs before, TCP sockets in use %d, TIME_WAIT %d" % (
        (after["Slab"] - base["Slab"]) / 1e6, after.get("tcp_inuse", 0), after.get("tcp_tw", 0)))
    text = "\n".join(lines)
    print("\n" + text)
    return text


def _f(v):
    return "-" if v is None else "%.2f" % v


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", "-c", type=int, default=100_000)
    ap.add_argument("--cores", type=int, default=0,
                    help="server core processes (default: c / %d rounded up)" % PER_PROCESS)
    ap.add_argument("--smp", type=int, default=0,
                    help="load processes (default: c / %d rounded up)" % PER_PROCESS)
    ap.add_argument("--ips", type=int, default=0,
                    help="client source addresses (default: c / 20,000 rounded up, +1)")
    ap.add_argument("--setup", type=float, default=40.0, help="seconds to open them all")
    ap.add_argument("--wait", type=float, default=10.0, help="idle seconds once connected")
    ap.add_argument("--epoch", type=float, default=10.0)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--ratio", type=float, default=0.05, help="high-priority share")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--connect-inflight", type=int, default=128,
                    help="connects in flight per load process")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--json", default=os.path.join(RESULTS, "scale.json"))
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 20,000 connections, short phases")
    args = ap.parse_args(argv)
    if args.quick:
        args.connections, args.setup, args.wait, args.duration, args.epoch = \
            20_000, 8.0, 4.0, 6.0, 4.0
    c = args.connections
    args.cores = args.cores or max(1, math.ceil(c / PER_PROCESS))
    args.smp = args.smp or max(1, math.ceil(c / PER_PROCESS))
    args.ips = args.ips or math.ceil(c / 20_000) + 1
    for what, n in (("--cores", args.cores), ("--smp", args.smp)):
        if c / n > FILE_LIMIT - 1000:
            ap.error("%s %d puts %d connections in a process; the limit here is %d files"
                     % (what, n, c // n, FILE_LIMIT))
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--backend" in argv:               # kernel is this file; ustack, bench/scale_ustack.py
        backend = argv[argv.index("--backend") + 1:][:1]
        if backend == ["ustack"]:
            import scale_ustack
            return scale_ustack.main(argv)
        if backend != ["kernel"]:
            sys.exit("scale: --backend kernel or ustack")
        argv = [a for i, a in enumerate(argv)
                if a != "--backend" and (i == 0 or argv[i - 1] != "--backend")]
    if argv[:1] == ["--report"]:          # print the report of a saved run again
        with open(argv[1]) as f:
            res = json.load(f)
        report(res, argparse.Namespace(**res["args"]))
        return
    args = parse_args(argv)
    started = time.monotonic()
    print("scale: %s connections, server --cores %d on CPU %d, load --smp %d --ips %d on "
          "CPU %d; setup %.0f s, wait %.0f s, epoch %.0f s, bursts of %d, window %.0f s" % (
              "{:,}".format(args.connections), args.cores, args.server_cpu, args.smp,
              args.ips, args.client_cpu, args.setup, args.wait, args.epoch, args.burst,
              args.duration), flush=True)
    res = run(args)
    text = report(res, args)
    res["report"] = text
    res["elapsed_s"] = time.monotonic() - started
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote %s (%.0f s)" % (os.path.relpath(args.json, h.REPO), res["elapsed_s"]))


if __name__ == "__main__":
    main()
