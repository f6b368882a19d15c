"""Overload benchmark: high-priority latency at 2x capacity, qstack vs FIFO servers.

    .venv/bin/python bench/priority.py [--quick] [--rounds N] [--servers LIST]
        [--grains connection,message] [--conns 1000] [--ratio 0.05]
        [--overload 2] [--half 0.5] [--ring-size 1024] [--batch 32]
        [--json FILE] [--plot FILE.png]

What it does.  Every server echoes 64-byte messages (qstack: apps.echo with
fixed:64 framing and the native rule "byte 5 == 0x01 is level 0").  For each
server, in a fresh process pinned to CPU 0 with the load generator
(`qstack load`, docs/LOAD.md) pinned to CPU 1:

1. capacity: a closed loop over --conns connections, --window (1) messages
   in flight on each, as under overload; capacity = replies/s.
2. half load: open loop (--rate) at --half x that server's own capacity,
   a share --ratio (5%) of the messages high priority (byte 5 = 0x01).
3. overload: the same at --overload (2) x capacity.

Open-loop latency counts from each message's *intended* send time, so a
server that falls behind is charged for the whole backlog (no coordinated
omission).  At 2x capacity the backlog grows without bound for as long as
the window lasts; nothing is dropped.  It builds up wherever the flow stops:
in the server's queues, in TCP buffers (a server that stops reading), and in
the generator, which keeps at most --window (1) messages in flight per
connection and holds the rest back ("deferred") with their intended time.
Why 1: the generator's CPU must not be the limit at 2x.  With a deeper
window the echo servers that read byte chunks (gevent, uvloop) move several
messages per system call, their capacity doubles, and twice that is more
than one client CPU can offer; with one message in flight per connection
the capacity run and the overload run see the same regime, and the
generator does about a closed loop's work at 2x (deferred sends cost no
system call).

Servers: qstack (priority on), qstack-off (``--levels 1``: one FIFO),
gevent (bench/peers/gevent_echo.py: StreamServer, a greenlet per
connection), uvloop (bench/peers/uvloop_echo.py: asyncio Protocol on
uvloop), c-epoll (bench/peers/epoll_echo.c, optional reference).

Grains (qstack load --grain): ``connection`` -- every connection is high or
low for the whole run (5% of the devices send only high-priority messages,
the others only low), ``message`` -- every message draws its priority, so
high and low messages share every connection.  The difference is the point:
priority can only reorder what the server has already read.  Under overload
a connection whose backlog is low-priority messages has them queued ahead
of its next high message in the generator's window and in TCP, in order,
and no server can serve a message before reading the ones sent before it on
the same connection (head-of-line blocking).  With per-connection priority
the high connections carry no backlog, and the server reads and serves them
first.  The FIFO servers are run with grain connection only (they ignore
priority either way).

qstack's server-side latency (message read by the stack -> reply written,
per level, from the core's own histograms; HCMonitor's view from the
server's side) is shown beside the client's.  The core reports them through
its JSON stats pipe every --stats-interval; this script launches qstack
through a small wrapper that points that pipe at a file and differences the
histograms of the snapshots that bracket the measured window.

qstack's tuning (--ring-size, --batch): under overload the low level's ring
fills, and the stack stops reading the connections whose next message is
low (TCP pushes back; nothing is dropped); a smaller ring bounds how much
low work is queued inside the server and how many sockets a stack step
reads, a smaller batch bounds how many low events the hub takes from the
ring at a time (with the inline stack a high message read meanwhile waits
for that batch to finish).  Defaults here: ring 1024, batch 32 (the server
defaults are 65536 and 128).  With --window 1 at most --conns messages are
in the server at once, so a ring of 1,024 never fills here: it holds the
same backlog as 65,536 but reuses 64 KiB of ring instead of sweeping 4 MiB
(in our sweep it served 125-131k replies/s at 2x, 65,536 97-131k); a ring
smaller than the backlog (256, 512) makes the stack pause and resume a low
connection for nearly every message (two epoll_ctl calls each), which cost
about 30% of the throughput and did not lower the high-priority tail.

Output: one table per grain (median over rounds), the target checks, raw
records to --json, and a CDF plot (high and low at 2x, each server) to
--plot.  Runs are bounded in time; every server is stopped (SIGTERM, then
SIGKILL of its process group).  Use a quiet machine.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import harness as h

PEERS = {name: os.path.join(h.PEERS, name + "_echo.py") for name in ("gevent", "uvloop")}
ALL_SERVERS = ["qstack", "qstack-off", "gevent", "uvloop", "c-epoll"]
DEFAULT_SERVERS = ["qstack", "qstack-off", "gevent", "uvloop"]
PRIORITY_SERVERS = {"qstack"}          # the ones run with every grain
RESULTS = os.path.join(h.BENCH, "results")
STACK_THREAD = "qs-stack"
SIZE = 64


# ---- launching qstack with its stats pipe on a file --------------------------

def serve_with_stats(stats_path, argv):
    """`qstack serve ARGV` in this process, the core's JSON stats lines
    (with the latency histograms) appended to stats_path."""
    sys.path.insert(0, h.REPO)           # this tree's qstack and apps, as -m would
    from qstack import cli, server
    orig = server.serve

    def serve(cfg, handler, core_index=0, stats_fd=None):
        fd = os.open(stats_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return orig(cfg, handler, core_index=core_index, stats_fd=fd)

    server.serve = serve
    return cli.main(["serve", *argv])


def nice(cfg):
    """argv prefix giving the server and the generator a higher CPU weight than
    other processes on a shared machine (the same for every server)."""
    return ["nice", "-n", str(cfg.nice)] if cfg.nice else []


def python():
    return h.VENV_PY if os.access(h.VENV_PY, os.X_OK) else sys.executable


def write_qstack_config(path, cfg):
    import yaml
    doc = {"server": {"stats_interval": cfg.stats_interval},
           "app": {"framing": "fixed:%d" % SIZE},
           "priority": {"rules": [{"offset": 5, "value": 1, "level": 0}]},
           "native": {"ring_size": cfg.ring_size, "batch": cfg.batch},
           "layout": {"stack": cfg.stack}}
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)


def server_argv(name, port, conf, stats_path):
    if name in ("qstack", "qstack-off"):
        argv = ["apps.echo:handle", "--config", conf, "--host", h.LOOPBACK,
                "--port", str(port), "--log-level", "warning"]
        if name == "qstack-off":
            argv += ["--levels", "1"]
        return [python(), os.path.abspath(__file__), "_serve", stats_path, "--"] + argv
    if name == "c-epoll":
        return [h.build("epoll_echo"), "--host", h.LOOPBACK, "--port", str(port)]
    return [python(), PEERS[name], "--host", h.LOOPBACK, "--port", str(port)]


# ---- server-side latency from the stats file -------------------------------

def read_snapshots(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    snap = json.loads(line)
                except ValueError:
                    continue
                if isinstance(snap, dict) and "levels" in snap:
                    out.append(snap)
    except OSError:
        pass
    return out


def server_side(path, t0, t1):
    """Per-level server-side latency over [t0, t1] (monotonic seconds, the
    same clock as the core's snapshots): the difference of the last snapshot
    at or before t0 and the first at or after t1."""
    from qstack.stats import percentile
    snaps = sorted(read_snapshots(path), key=lambda s: s["t"])
    before = [s for s in snaps if s["t"] <= t0]
    after = [s for s in snaps if s["t"] >= t1]
    if not before or not after:
        return None
    a, b = before[-1], after[0]
    levels = []
    for la, lb in zip(a["levels"], b["levels"]):
        hist = [y - x for x, y in zip(la["lat"], lb["lat"])]
        us = lambda ns: None if ns is None else ns / 1e3   # noqa: E731
        levels.append({"requests": lb["requests"] - la["requests"],
                       "p50_us": us(percentile(hist, 0.5)),
                       "p99_us": us(percentile(hist, 0.99)),
                       "p999_us": us(percentile(hist, 0.999)),
                       "max_queued": max(s["levels"][len(levels)]["queued"]
                                         for s in snaps if a["t"] <= s["t"] <= b["t"]),
                       "hist": hist})
    return {"span_s": b["t"] - a["t"], "levels": levels}


# ---- one run ----------------------------------------------------------------

def classify(comm):
    return "stack" if comm == STACK_THREAD else "rest"


def run_one(cfg, name, *, kind, rate=0.0, grain="connection", conns=None, ratio=None):
    """Start the server, drive it, stop it. Returns a record (or "failed")."""
    conns = conns or cfg.conns
    ratio = cfg.ratio if ratio is None else ratio
    port = h.free_port()
    os.makedirs(os.path.join(RESULTS, "logs"), exist_ok=True)
    stats_path = os.path.join(cfg.tmp, "stats-%s-%s-%d.jsonl" % (name, kind, port))
    argv = nice(cfg) + server_argv(name, port, cfg.conf, stats_path)
    rec = {"server": name, "kind": kind, "rate": rate, "grain": grain, "conns": conns,
           "ratio": ratio}
    srv = h.Server(name, argv, cfg.server_cpu,
                   log_path=os.path.join(RESULTS, "logs", "priority-%s.log" % name))
    marks = {}
    res = {"error": "not run"}
    try:
        why = srv.wait_port(port)
        if why:
            tail = srv.log_tail()
            return dict(rec, failed=why + ((": " + tail.replace("\n", " | ")) if tail else ""))

        def on_mark(what):
            marks[what] = (time.monotonic(), h.thread_times(srv.pid), cpu_jiffies())

        # The capacity run keeps --window messages in flight per connection,
        # as the generator does under overload, so both runs see the same
        # regime (with a deeper window, servers that echo byte chunks move
        # several messages per system call) and "2x capacity" is 2x for all.
        extra = ["-r", str(ratio), "--grain", grain, "--window", str(cfg.window),
                 "--log-duration", "1"]
        res = h.run_client(nice(cfg) + h.load_command(), port, cfg.client_cpu, conns=conns,
                           size=SIZE, warmup=cfg.warmup,
                           duration=cfg.cap_duration if kind == "capacity" else cfg.duration,
                           rate=rate, drain=cfg.drain, on_mark=on_mark, extra=extra,
                           keep_doc=True)
        rec["died"] = not srv.alive()
        if name.startswith("qstack"):
            time.sleep(2.5 * cfg.stats_interval)   # one more snapshot after the window
    finally:
        rec["exit"] = srv.stop()
    if "error" in res or "start" not in marks or "end" not in marks:
        rec["failed"] = res.get("error", "no measured window")
        return rec
    doc = res.pop("doc")
    (t0, th0, cpu0), (t1, th1, cpu1) = marks["start"], marks["end"]
    window = t1 - t0
    by_class, _, _, allowed = h.cpu_delta(th0, th1, classify)
    rec["util"] = sum(by_class.values()) / window
    rec["pinned"] = all(a == str(cfg.server_cpu) for a in allowed)
    # Others: task time (user+system) on our two CPUs that was not the
    # server's or the client's, plus time the hypervisor stole.  Interrupt
    # and softirq time is left out: the kernel accounts it apart from every
    # task, and on loopback most of it is our own traffic.
    share = {}
    for cpu in (cfg.server_cpu, cfg.client_cpu):
        if cpu in cpu0 and cpu in cpu1:
            d = [b - a for a, b in zip(cpu0[cpu], cpu1[cpu])]
            total = sum(d) or 1
            share[cpu] = {"task": (d[0] + d[1] + d[2]) / total, "steal": d[7] / total,
                          "softirq": (d[5] + d[6]) / total}
    s0, s1 = share.get(cfg.server_cpu), share.get(cfg.client_cpu)
    rec["softirq"] = s0["softirq"] if s0 else None
    rec["other"] = max(max(0.0, s0["task"] - rec["util"]) + s0["steal"] if s0 else 0.0,
                       max(0.0, s1["task"] - res["client_cpu"]) + s1["steal"] if s1 else 0.0)
    lat = doc["latency_ms"]
    us = lambda v: None if v is None else v * 1e3    # noqa: E731
    win, msg = doc["window"], doc["messages"]
    rec.update(
        rps=win["responses_per_s"], offered=win["offered_per_s"], sent_per_s=win["sent_per_s"],
        seconds=win["seconds"], incomplete=win["incomplete"],
        errors=res["errors"], client_busy=res["client_busy"],
        deferred=msg["deferred"], problems=doc["problems"],
        hist={"high": doc["histograms"]["high"], "low": doc["histograms"]["low"]})
    for level in ("all", "high", "low"):
        for q in ("p50", "p90", "p99", "p99.9", "max", "mean"):
            rec["%s_%s" % (level, q.replace(".", ""))] = us(lat[level][q])
        rec["%s_count" % level] = lat[level]["count"]
        # The p99 of each 1-second interval of the window, and their median:
        # a stall of the machine (this VM loses its CPUs for tens of ms now
        # and then) moves the window's p99 but only its own second's.
        per_s = [us(iv["latency_ms"][level]["p99"]) for iv in doc.get("intervals", [])
                 if iv["latency_ms"][level]["count"]]
        rec["%s_p99_1s" % level] = per_s
        rec["%s_p99_med1s" % level] = median(per_s)
    # Of the messages due in the window, the share that was answered at all:
    # under overload the rest were still queued (in the server, in TCP, or
    # held back by the generator) when the run ended.
    due = (win["offered_per_s"] or 0) * win["seconds"]
    rec["answered"] = lat["all"]["count"] / due if due else None
    if name.startswith("qstack"):
        rec["server_side"] = server_side(stats_path, t0, t1)
    try:
        os.unlink(stats_path)
    except OSError:
        pass
    return rec


def fmt_us(v):
    if v is None:
        return "-"
    if v >= 100_000:
        return "{:,.0f}".format(v / 1000) + "ms"
    return "%.0f" % v if v >= 100 else "%.1f" % v


def describe(rec):
    if "failed" in rec:
        return "FAILED: " + rec["failed"]
    s = "%9s/s  high p50 %7s p99 %7s  low p50 %7s p99 %7s us  srv %3.0f%% cli %3.0f%%" % (
        "{:,.0f}".format(rec["rps"]), fmt_us(rec["high_p50"]), fmt_us(rec["high_p99"]),
        fmt_us(rec["low_p50"]), fmt_us(rec["low_p99"]), 100 * rec["util"],
        100 * rec["client_busy"])
    if rec.get("high_p99_med1s") is not None:
        s += "  high p99 of a median second %s" % fmt_us(rec["high_p99_med1s"])
    ss = rec.get("server_side")
    if ss:
        s += "  server-side p99 " + "/".join(fmt_us(lv["p99_us"]) for lv in ss["levels"])
    if rec.get("answered") is not None and rec["kind"] != "capacity":
        s += "  answered %.0f%%" % (100 * rec["answered"])
    if rec["errors"]:
        s += "  errors %d" % rec["errors"]
    if rec.get("died"):
        s += "  SERVER DIED"
    if rec["other"] > 0.05:
        s += "  ~ others %.0f%%" % (100 * rec["other"])
    return s


# ---- the plan ----------------------------------------------------------------

def plan(cfg):
    """[(server, grain)] to run at half load and overload."""
    out = []
    for name in cfg.servers:
        grains = cfg.grains if name in PRIORITY_SERVERS else [cfg.grains[0]]
        out += [(name, g) for g in grains]
    return out


def cpu_jiffies():
    """{cpu: [user, nice, system, idle, iowait, irq, softirq, steal]} from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *vals = line.split()
                out[int(name[3:])] = [int(v) for v in vals[:8]]
    return out


def machine_busy(seconds=1.0):
    """Share of all CPUs busy over `seconds` (nothing of ours runs meanwhile)."""
    a = h.cpu_busy_jiffies()
    time.sleep(seconds)
    b = h.cpu_busy_jiffies()
    busy = sum(b[c][0] - a[c][0] for c in b if c in a)
    total = sum(b[c][1] - a[c][1] for c in b if c in a)
    return busy / total if total else 0.0


def wait_quiet(cfg):
    """Before a run: wait (bounded) until other processes leave the CPUs idle."""
    deadline = time.monotonic() + cfg.quiet_wait
    waited = False
    while True:
        busy = machine_busy()
        if busy <= cfg.quiet_limit or time.monotonic() >= deadline:
            if waited:
                print("%13s(waited for a quiet machine: now %.0f%% busy)" % ("", 100 * busy),
                      flush=True)
            return busy
        waited = True
        time.sleep(2.0)


def run_checked(cfg, name, **kw):
    """run_one, again (bounded) while others disturbed it: keep the quietest."""
    wait_quiet(cfg)
    rec = run_one(cfg, name, **kw)
    tries = 0
    while ("failed" not in rec and rec["other"] > cfg.noise_limit
           and tries < cfg.noise_retries and cfg.retry_budget > 0):
        tries += 1
        cfg.retry_budget -= 1
        print("%13s^ disturbed: others used %.0f%% of a CPU; running it again" % (
            "", 100 * rec["other"]), flush=True)
        time.sleep(cfg.noise_pause)
        wait_quiet(cfg)
        again = run_one(cfg, name, **kw)
        if "failed" not in again and again["other"] < rec["other"]:
            rec = again
    rec["disturbed"] = "failed" not in rec and rec["other"] > cfg.noise_limit
    rec["retries"] = tries
    return rec


def run_all(cfg):
    runs = []
    for rnd in range(cfg.rounds):
        order = cfg.servers[rnd % len(cfg.servers):] + cfg.servers[:rnd % len(cfg.servers)]
        for name in order:
            label = "[round %d] %-10s" % (rnd + 1, name)
            cap = run_checked(cfg, name, kind="capacity", grain=cfg.grains[0])
            cap["round"] = rnd + 1
            runs.append(cap)
            print("%s capacity (closed, %d conns) %s" % (label, cfg.conns, describe(cap)),
                  flush=True)
            if "failed" in cap or not cap["rps"]:
                continue
            grains = cfg.grains if name in PRIORITY_SERVERS else [cfg.grains[0]]
            for grain in grains:
                for kind, factor in (("half", cfg.half), ("overload", cfg.overload)):
                    rate = factor * cap["rps"]
                    rec = run_checked(cfg, name, kind=kind, rate=rate, grain=grain)
                    rec.update(round=rnd + 1, capacity=cap["rps"], factor=factor)
                    runs.append(rec)
                    print("%s %-8s %-10s @%s/s (%.1fx) %s" % (
                        label, kind, grain, "{:,.0f}".format(rate), factor, describe(rec)),
                        flush=True)
        qcap = [r["rps"] for r in runs if r["server"] == "qstack" and r["kind"] == "capacity"
                and r.get("round") == rnd + 1 and "failed" not in r]
        if cfg.floor and qcap:
            # The machine's floor for the high-priority traffic alone: the C
            # epoll server echoing just the high connections of qstack's
            # overload run (their count and rate), nothing else running.
            n = max(1, round(cfg.conns * cfg.ratio))
            rate = cfg.ratio * cfg.overload * qcap[0]
            rec = run_checked(cfg, "c-epoll", kind="floor", rate=rate, conns=n, ratio=1.0)
            rec.update(round=rnd + 1, capacity=None, factor=None)
            runs.append(rec)
            print("[round %d] %-10s floor: %d high conns alone @%s/s %s" % (
                rnd + 1, "c-epoll", n, "{:,.0f}".format(rate), describe(rec)), flush=True)
    return runs


# ---- summary -----------------------------------------------------------------

def median(values):
    return h.median(values)


def summarize(runs, cfg):
    """{(server, grain): {"capacity", "half": {...}, "overload": {...}}} of medians."""
    out = {}
    caps = {}
    for r in runs:
        if r["kind"] == "capacity" and "failed" not in r:
            caps.setdefault(r["server"], []).append(r["rps"])
    for name, grain in plan(cfg):
        row = {"capacity": median(caps.get(name, [])), "server": name, "grain": grain}
        for kind in ("half", "overload"):
            rs = [r for r in runs if r["server"] == name and r["grain"] == grain
                  and r["kind"] == kind and "failed" not in r]
            if not rs:
                continue
            d = {"rounds": len(rs), "failed": sum(1 for r in runs if r["server"] == name
                                                  and r["grain"] == grain and r["kind"] == kind
                                                  and "failed" in r)}
            d["disturbed"] = sum(1 for r in rs if r.get("disturbed"))
            for key in ("rate", "rps", "util", "client_busy", "answered", "other",
                        "all_p50", "all_p99", "high_p50", "high_p99", "high_p999",
                        "low_p50", "low_p99", "high_max", "high_p99_med1s", "all_p99_med1s"):
                d[key] = median([r.get(key) for r in rs])
            d["high_p99_rounds"] = [r.get("high_p99") for r in rs]
            d["errors"] = sum(r["errors"] for r in rs)
            d["spread_high_p99"] = h.spread_pct([r.get("high_p99") for r in rs])
            sides = [r.get("server_side") for r in rs if r.get("server_side")]
            if sides:
                nlev = len(sides[0]["levels"])
                d["server_side"] = [
                    {"p50_us": median([s["levels"][i]["p50_us"] for s in sides]),
                     "p99_us": median([s["levels"][i]["p99_us"] for s in sides]),
                     "max_queued": median([s["levels"][i]["max_queued"] for s in sides])}
                    for i in range(nlev)]
            row[kind] = d
        out[(name, grain)] = row
    return out


def floor_summary(runs):
    rs = [r for r in runs if r["kind"] == "floor" and "failed" not in r]
    if not rs:
        return None
    return {"rounds": len(rs), "rate": median([r["rate"] for r in rs]),
            "conns": rs[0]["conns"], "p50": median([r["high_p50"] for r in rs]),
            "p99": median([r["high_p99"] for r in rs]),
            "p999": median([r["high_p999"] for r in rs])}


def print_tables(summary, cfg, floor=None):
    lines = []
    for grain in cfg.grains:
        rows = [r for (n, g), r in summary.items() if g == grain]
        if not rows:
            continue
        lines.append("")
        lines.append("grain %s: %s" % (grain, {
            "connection": "5% of the connections send only high-priority messages",
            "message": "each message high with probability 5%, on every connection"}
            .get(grain, grain) if cfg.ratio == 0.05 else "ratio %g" % cfg.ratio))
        lines.append("| server | capacity/s | load | offered/s | replies/s | high p50 | "
                     "high p99 | high p99, median second | low p50 | low p99 | "
                     "server-side high p50 / p99 | server-side low p50 / p99 | srv CPU |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            for kind in ("half", "overload"):
                d = r.get(kind)
                if not d:
                    continue
                ss = d.get("server_side")
                if ss and len(ss) == 2:
                    sh = "%s / %s" % (fmt_us(ss[0]["p50_us"]), fmt_us(ss[0]["p99_us"]))
                    sl = "%s / %s" % (fmt_us(ss[1]["p50_us"]), fmt_us(ss[1]["p99_us"]))
                elif ss:
                    sh = sl = "%s / %s (one level)" % (fmt_us(ss[0]["p50_us"]),
                                                       fmt_us(ss[0]["p99_us"]))
                else:
                    sh = sl = "-"
                lines.append("| %s | %s | %.1fx | %s | %s | %s | %s | %s | %s | %s | %s | %s | %.0f%% |" % (
                    r["server"] + (" (~)" if d.get("disturbed") else ""),
                    "{:,.0f}".format(r["capacity"] or 0),
                    d["rate"] / r["capacity"] if r["capacity"] else 0,
                    "{:,.0f}".format(d["rate"]), "{:,.0f}".format(d["rps"]),
                    fmt_us(d["high_p50"]), fmt_us(d["high_p99"]),
                    fmt_us(d.get("high_p99_med1s")), fmt_us(d["low_p50"]),
                    fmt_us(d["low_p99"]), sh, sl, 100 * (d["util"] or 0)))
    if floor:
        lines.append("")
        lines.append("Floor of this machine: the C epoll server echoing only the %d high-priority "
                     "connections' traffic (%s msg/s, nothing else): p50 %s, p99 %s, p99.9 %s us "
                     "(median of %d)." % (floor["conns"], "{:,.0f}".format(floor["rate"]),
                                          fmt_us(floor["p50"]), fmt_us(floor["p99"]),
                                          fmt_us(floor["p999"]), floor["rounds"]))
    lines.append("")
    lines.append("(~): the median includes a run that others disturbed (they used more than "
                 "%.0f%% of the server's or the client's CPU) even after repeats." % (
                     100 * cfg.noise_limit))
    lines.append("Latencies in microseconds (ms where marked), client-side from the intended "
                 "send time; server-side: read by the stack -> reply written (qstack's own "
                 "histograms, 8 buckets per power of two: <= 12.5% high).")
    print("\n".join(lines))
    return "\n".join(lines)


def check_targets(summary, cfg):
    out = []
    for (name, grain), r in summary.items():
        half, over = r.get("half"), r.get("overload")
        if not half or not over:
            continue
        if name in PRIORITY_SERVERS:
            p99, base = over["high_p99"], half["high_p99"]
            if p99 is None or base is None:
                continue
            ok1, ok2 = p99 < 2000, p99 <= 3 * base
            out.append("%s grain %s: high p99 at %.1fx = %s us (target < 2 ms: %s), "
                       "%.1fx its p99 at %.1fx load = %s us (target <= 3x: %s); "
                       "rounds: %s; p99 of a median second %s us (at %.1fx: %s us)" % (
                           name, grain, cfg.overload, fmt_us(p99), "met" if ok1 else "MISSED",
                           p99 / base, cfg.half, fmt_us(base), "met" if ok2 else "MISSED",
                           ", ".join(fmt_us(v) for v in over["high_p99_rounds"]),
                           fmt_us(over.get("high_p99_med1s")), cfg.half,
                           fmt_us(half.get("high_p99_med1s"))))
        else:
            p99, base = over["all_p99"], half["all_p99"]
            if p99 is None or base is None:
                continue
            out.append("%s (FIFO) grain %s: p99 grows %.0fx from %.1fx to %.1fx load "
                       "(%s -> %s us; target > 20x: %s)" % (
                           name, grain, p99 / base, cfg.half, cfg.overload, fmt_us(base),
                           fmt_us(p99), "met" if p99 > 20 * base else "MISSED"))
    if out:
        print("\nTargets:\n  " + "\n  ".join(out))
    return out


def plot(runs, cfg, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'qstack[plot]')")
        return
    from qstack.loadgen.hist import Histogram
    grains = [g for g in cfg.grains]
    fig, axes = plt.subplots(1, len(grains), figsize=(7 * len(grains), 4.8), squeeze=False)
    colors = {"qstack": "tab:red", "qstack-off": "tab:orange", "gevent": "tab:green",
              "uvloop": "tab:blue", "c-epoll": "tab:gray"}
    for ax, grain in zip(axes[0], grains):
        for name in cfg.servers:
            for kind, alpha in (("overload", 1.0), ("half", 0.45)):
                rs = [r for r in runs if r["server"] == name and r["kind"] == kind
                      and r["grain"] == grain and "failed" not in r]
                if not rs:
                    continue
                for level, ls in (("high", "-"), ("low", "--")):
                    hist = Histogram.merged([Histogram.from_json(r["hist"][level]) for r in rs])
                    pts = hist.cdf_points()
                    if not pts:
                        continue
                    if kind == "half" and (level == "low" or name not in PRIORITY_SERVERS):
                        continue             # keep the plot readable
                    ax.step([max(v, 1) / 1e6 for v, _ in pts], [f for _, f in pts],
                            where="post", color=colors.get(name, "black"), linestyle=ls,
                            alpha=alpha, linewidth=1.6 if level == "high" else 1.1,
                            label="%s %s @%.1fx" % (name, level, rs[0]["factor"]))
        ax.set_xscale("log")
        ax.set_xlabel("latency, ms (client side, from intended send time)")
        ax.set_ylabel("cumulative fraction")
        ax.set_ylim(0, 1.01)
        ax.axvline(2.0, color="black", linewidth=0.8, linestyle=":")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title("echo 64 B, %d conns, %.0f%% high, grain %s: %.1fx and %.1fx capacity"
                     % (cfg.conns, 100 * cfg.ratio, grain, cfg.overload, cfg.half), fontsize=9)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print("wrote " + path)


# ---- main ----------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, short windows")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3, --quick 1)")
    ap.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                    help="comma-separated, of " + ",".join(ALL_SERVERS))
    ap.add_argument("--grains", default="connection,message",
                    help="qstack load --grain values to run qstack with; the FIFO "
                         "servers run the first only (default connection,message)")
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--ratio", type=float, default=0.05, help="high-priority share")
    ap.add_argument("--half", type=float, default=0.5, help="the low load, x capacity")
    ap.add_argument("--overload", type=float, default=2.0, help="the overload, x capacity")
    ap.add_argument("--window", type=int, default=1,
                    help="qstack load --window: messages in flight per connection")
    ap.add_argument("--duration", type=float, default=None,
                    help="measured seconds of each open-loop run (default 8, --quick 3)")
    ap.add_argument("--cap-duration", type=float, default=None,
                    help="measured seconds of the capacity run (default 4, --quick 2)")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--drain", type=float, default=2.0)
    ap.add_argument("--ring-size", type=int, default=1024,
                    help="qstack native.ring_size (events per level ring; default 1024)")
    ap.add_argument("--batch", type=int, default=32,
                    help="qstack native.batch (events the hub takes per poll; default 32)")
    ap.add_argument("--stack", choices=("auto", "inline", "thread"), default="auto",
                    help="qstack layout.stack (auto: inline, the server has one CPU)")
    ap.add_argument("--stats-interval", type=float, default=0.25,
                    help="qstack server.stats_interval for the server-side figures")
    ap.add_argument("--noise-limit", type=float, default=0.08,
                    help="a run is disturbed when other processes used more than this "
                         "share of the server's or the client's CPU in its window")
    ap.add_argument("--noise-retries", type=int, default=2,
                    help="run a disturbed run again up to this many times, keeping the "
                         "quietest (default 2; at most 12 repeats in all)")
    ap.add_argument("--noise-pause", type=float, default=3.0,
                    help="seconds to wait before repeating a disturbed run")
    ap.add_argument("--quiet-limit", type=float, default=0.05,
                    help="before each run, wait until the machine is at most this busy "
                         "(share of all CPUs over 1 s; default 0.05) ...")
    ap.add_argument("--quiet-wait", type=float, default=90.0,
                    help="... but at most this many seconds (default 90)")
    ap.add_argument("--nice", type=int, default=0,
                    help="run the servers and the generator at this niceness (e.g. -10 "
                         "as root, so that other processes on a shared machine disturb "
                         "them less; the same for every server; default 0)")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip the floor run (C epoll server, high connections alone)")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--json", metavar="FILE", default=os.path.join(RESULTS, "priority.json"))
    ap.add_argument("--plot", metavar="FILE.png",
                    default=os.path.join(RESULTS, "priority-cdf.png"))
    cfg = ap.parse_args(argv)
    cfg.rounds = cfg.rounds or (1 if cfg.quick else 3)
    cfg.retry_budget = 12
    cfg.duration = cfg.duration or (3.0 if cfg.quick else 8.0)
    cfg.cap_duration = cfg.cap_duration or (2.0 if cfg.quick else 4.0)
    cfg.servers = [s.strip() for s in cfg.servers.split(",") if s.strip()]
    bad = [s for s in cfg.servers if s not in ALL_SERVERS]
    if bad:
        ap.error("unknown server(s): %s" % ", ".join(bad))
    cfg.grains = [g.strip() for g in cfg.grains.split(",") if g.strip()]
    if not cfg.grains or any(g not in ("connection", "message") for g in cfg.grains):
        ap.error("--grains takes connection and/or message")
    if cfg.conns > 9000:
        ap.error("at most 9,000 connections (one process each side, 20,000 files)")
    return cfg


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_serve"]:               # the qstack wrapper (see serve_with_stats)
        rest = argv[2:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        sys.exit(serve_with_stats(argv[1], rest))
    cfg = parse_args(argv)
    ncpu = os.cpu_count() or 1
    if max(cfg.server_cpu, cfg.client_cpu) >= ncpu:
        sys.exit("need CPUs %d and %d; this machine has %d" % (
            cfg.server_cpu, cfg.client_cpu, ncpu))
    os.sched_setaffinity(0, {cfg.client_cpu})
    started = time.monotonic()
    load_before = os.getloadavg()
    print("priority bench: servers %s, grains %s, %d conns x %d B, %.0f%% high, "
          "%.1fx and %.1fx capacity, window %.0f s, %d round(s); qstack ring %d batch %d "
          "stack %s; load average %.2f" % (",".join(cfg.servers), ",".join(cfg.grains),
                                           cfg.conns, SIZE, 100 * cfg.ratio, cfg.half,
                                           cfg.overload, cfg.duration, cfg.rounds,
                                           cfg.ring_size, cfg.batch, cfg.stack,
                                           load_before[0]),
          flush=True)
    with tempfile.TemporaryDirectory(prefix="qstack-prio-") as tmp:
        cfg.tmp = tmp
        cfg.conf = os.path.join(tmp, "qstack.yaml")
        write_qstack_config(cfg.conf, cfg)
        runs = run_all(cfg)
    summary = summarize(runs, cfg)
    floor = floor_summary(runs)
    table = print_tables(summary, cfg, floor)
    targets = check_targets(summary, cfg)
    elapsed = time.monotonic() - started
    print("\ntotal time %.0f s; load average now %.2f" % (elapsed, os.getloadavg()[0]))
    if cfg.plot:
        plot(runs, cfg, cfg.plot)
    if cfg.json:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=h.REPO, capture_output=True,
                                text=True).stdout.strip()
        doc = {"meta": {"argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "commit": commit, "kernel": platform.release(), "cpus": ncpu,
                        "elapsed_s": elapsed, "loadavg_before": load_before,
                        "config": {k: v for k, v in vars(cfg).items()
                                   if k not in ("json", "tmp", "conf")}},
               "table": table, "targets": targets,
               "summary": [dict(v, key=list(k)) for k, v in summary.items()],
               "floor": floor,
               "runs": runs}
        with open(cfg.json, "w") as f:
            json.dump(doc, f, indent=1)
        print("wrote " + cfg.json)


if __name__ == "__main__":
    main()
