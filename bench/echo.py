"""Echo benchmark: qstack side by side with C epoll and io_uring servers,
uvloop, asyncio and gevent.

    .venv/bin/python bench/echo.py [--quick] [--json FILE]
        [--servers qstack,qstack-uring,c-epoll,c-uring,uvloop,asyncio,gevent]
        [--duration S]

"qstack" is the kernel backend (epoll; named so, not left to the default,
so that the series stays comparable), "qstack-uring" the uring backend;
"c-uring" (bench/peers/uring_echo.c: multishot accept and recv into a
provided-buffer ring, sends through the ring, one io_uring_enter per loop)
is the io_uring ceiling as c-epoll is the epoll one.

What it measures. Each server echoes whatever it reads. The load generator
(`qstack load --closed`, the native engine of docs/LOAD.md) keeps N
connections busy in a closed loop: send an L-byte message, wait for all L
bytes back, check them, send the next. Every (server, L in {64 B, 1 KiB}, N in {100,
1000}) is run in a fresh server process pinned to CPU 0 with the client
pinned to CPU 1, so the two never share a core. For the measured window the
client reports requests/s and latency percentiles (log-linear histogram,
<1% bucket error), and the runner reads the server's CPU time per thread
from /proc, giving CPU microseconds per request. For qstack this is split
into the native stack thread ("qs-stack") and the rest (the Python thread
with the greenlet workers). Servers are interleaved in rounds (3 in full
mode, 1 with --quick, order rotated each round) and each figure is the
median over rounds; the qstack ratios are medians of per-round ratios, i.e.
of runs that were close in time. Then an open-loop section (64 B, 1,000
connections) offers one fixed rate to every server -- half the C epoll
server's closed-loop rate, capped at 80% of the slowest server's so that
everyone is below saturation; --open-rate sets it -- and reports CPU per
request and latency there. Open-loop latency is counted from each request's
intended send time, so a stall is charged to every request it delays.

How to read it. req/s in the closed loop is the server's capacity on one
core *given this client on the other core*. The client runs on io_uring
(`qstack load --backend uring`, --client-backend; kernel where io_uring is
refused): on epoll it cost about as much per request as the C epoll server,
so every fast server's row was the client's ceiling; on io_uring the
servers reach ~100% CPU first (check srv CPU%: near 100% means the server,
not the client, was the limit). Compare servers by "CPU us/req" first: it is the figure that
survives the client ceiling and what decides capacity when the server owns
a core. In the closed loop, p50 is roughly N / throughput (Little's law),
so latency columns there say more about throughput than about tail
behaviour; the open-loop p50/p99 are the fair latency comparison. "+-%" is
half the min-max spread over rounds; treat differences smaller than it as
noise. "other%" is the larger of: CPU 0 time the server did not use, and
CPU 1 time the client did not use, while both CPUs were busy -- i.e. other
processes on this shared machine. A run with other% above 10% is repeated
once (bounded) and flagged "disturbed" if it stays so. Open-loop CPU/request
is higher than closed-loop for every server: at partial load each wake-up
from idle is paid per few requests, and on this VM a wake-up costs 15-25 us.
Raw figures for every run, including per-thread CPU, go to --json FILE.
"""
import argparse
import json
import os
import platform
import sys
import time

import harness as h

ALL_SERVERS = ["qstack", "qstack-uring", "c-epoll", "c-uring", "uvloop", "asyncio", "gevent"]
QSTACK_BACKENDS = {"qstack": "kernel", "qstack-uring": "uring"}
PEER_SCRIPTS = {name: os.path.join(h.BENCH, "peers", name + "_echo.py")
                for name in ("uvloop", "asyncio", "gevent")}
QSTACK = os.path.join(h.REPO, ".venv", "bin", "qstack")
VENV_PY = os.path.join(h.REPO, ".venv", "bin", "python")
STACK_THREAD = "qs-stack"
RESULTS = os.path.join(h.BENCH, "results")


class Unavailable(Exception):
    pass


def server_argv(name, port):
    if name in QSTACK_BACKENDS:
        if not os.access(QSTACK, os.X_OK):
            raise Unavailable(".venv/bin/qstack does not exist yet")
        return [QSTACK, "serve", "apps.echo:handle", "--host", h.LOOPBACK,
                "--port", str(port), "--backend", QSTACK_BACKENDS[name]]
    if name == "c-epoll":
        return [h.build("epoll_echo"), "--host", h.LOOPBACK, "--port", str(port)]
    if name == "c-uring":
        try:
            return [h.build("uring_echo"), "--host", h.LOOPBACK, "--port", str(port)]
        except Exception as exc:       # no liburing-dev: the peer is unavailable
            raise Unavailable(f"cannot build uring_echo: {exc}") from None
    py = VENV_PY if os.access(VENV_PY, os.X_OK) else sys.executable
    return [py, PEER_SCRIPTS[name], "--host", h.LOOPBACK, "--port", str(port)]


def classify(comm):
    return "stack" if comm == STACK_THREAD else "rest"


# ---- one run ----------------------------------------------------------------

def run_one(cfg, client, name, *, size, conns, rate=0.0):
    """Start the server, drive it, stop it. Returns a run record."""
    port = h.free_port()
    rec = {"server": name, "size": size, "conns": conns,
           "mode": "open" if rate > 0 else "closed", "rate": rate}
    argv = server_argv(name, port)
    os.makedirs(os.path.join(RESULTS, "logs"), exist_ok=True)
    srv = h.Server(name, argv, cfg.server_cpu,
                   log_path=os.path.join(RESULTS, "logs", name + ".log"))
    try:
        why = srv.wait_port(port)
        if why:
            tail = srv.log_tail()
            raise Unavailable(why + ((": " + tail.replace("\n", " | ")) if tail else ""))
        marks = {}

        def on_mark(what):
            marks[what] = (time.monotonic(), h.thread_times(srv.pid),
                           h.cpu_busy_jiffies())

        res = h.run_client(client, port, cfg.client_cpu, conns=conns, size=size,
                           warmup=cfg.warmup, duration=cfg.duration, rate=rate,
                           drain=cfg.drain, on_mark=on_mark)
        rec["died"] = not srv.alive()
    finally:
        rec["exit"] = srv.stop()
    rec["client"] = res
    if "error" in res or "start" not in marks or "end" not in marks:
        rec["failed"] = res.get("error", "no measured window")
        return rec
    (t0, th0, cpu0), (t1, th1, cpu1) = marks["start"], marks["end"]
    window = t1 - t0
    by_class, by_ticks, by_comm, allowed = h.cpu_delta(th0, th1, classify)
    rps = res["rps"]
    util = sum(by_class.values()) / window
    rec.update(window_s=window, rps=rps, p50=res["p50_us"], p99=res["p99_us"],
               p999=res["p999_us"], errors=res["errors"],
               incomplete=res["incomplete"], client_busy=res["client_busy"],
               client_cpu=res["client_cpu"],
               util=util, util_ticks=sum(by_ticks.values()) / window,
               threads={k: v / window for k, v in by_comm.items()},
               cpus_allowed=sorted(allowed))
    # taskset pins the process; a server that re-pins its own threads (a
    # core layout) may move onto the client's CPU. Say so rather than guess.
    rec["pinned"] = all(a == str(cfg.server_cpu) for a in allowed)
    for cls in ("stack", "rest"):
        rec[cls + "_util"] = by_class.get(cls, 0.0) / window
    per_req = (lambda u: u * 1e6 / rps) if rps > 0 else (lambda u: None)
    rec["cpu_us"] = per_req(util)
    rec["stack_us"] = per_req(rec["stack_util"])
    rec["rest_us"] = per_req(rec["rest_util"])
    for cpu in (cfg.server_cpu, cfg.client_cpu):
        if cpu in cpu0 and cpu in cpu1:
            busy = cpu1[cpu][0] - cpu0[cpu][0]
            total = cpu1[cpu][1] - cpu0[cpu][1]
            rec["cpu%d_busy" % cpu] = busy / total if total else None
    # Time on our two CPUs that neither the server nor the client used:
    # other processes on this shared machine, interrupts. A gauge of noise.
    busy0 = rec.get("cpu%d_busy" % cfg.server_cpu)
    busy1 = rec.get("cpu%d_busy" % cfg.client_cpu)
    rec["cpu0_other"] = max(0.0, busy0 - util) if busy0 is not None else None
    rec["cpu1_other"] = (max(0.0, busy1 - res["client_cpu"])
                         if busy1 is not None else None)
    rec["other"] = max(rec["cpu0_other"] or 0.0, rec["cpu1_other"] or 0.0)
    return rec


def describe(rec):
    if "failed" in rec:
        return "FAILED: " + rec["failed"]
    s = "%9s req/s  p50 %8.1f  p99 %8.1f us  srv %3.0f%%  %5.2f us/req" % (
        "{:,.0f}".format(rec["rps"]), rec["p50"], rec["p99"], 100 * rec["util"],
        rec["cpu_us"] or 0)
    if rec["stack_util"] > 0:
        s += " (stack %.2f + py %.2f)" % (rec["stack_us"], rec["rest_us"])
    s += "  cli %3.0f%%" % (100 * rec["client_busy"])
    if rec["errors"] or rec["incomplete"]:
        s += "  errors %d incomplete %d" % (rec["errors"], rec["incomplete"])
    if rec.get("died"):
        s += "  SERVER DIED"
    if not rec["pinned"]:
        s += "  ! server threads allowed on CPUs %s" % ",".join(rec["cpus_allowed"])
    return s


# ---- the plan ---------------------------------------------------------------

def run_rounds(cfg, client, servers, configs, unavailable, runs, rate_of=None):
    for rnd in range(cfg.rounds):
        shift = rnd % len(servers)
        order = servers[shift:] + servers[:shift]
        for size, conns in configs:
            for name in order:
                if name in unavailable:
                    continue
                rate = rate_of(size, conns) if rate_of else 0.0
                label = "[round %d] %-12s %4d B x %4d %s" % (
                    rnd + 1, name, size, conns,
                    "open @%s/s" % "{:,.0f}".format(rate) if rate else "closed")
                try:
                    rec = run_one(cfg, client, name, size=size, conns=conns, rate=rate)
                    for _ in range(cfg.noise_retries):
                        if ("failed" in rec or rec["other"] <= cfg.noise_limit
                                or cfg.retry_budget <= 0):
                            break
                        cfg.retry_budget -= 1
                        print("%s  %s\n%s  ^ disturbed: others used %.0f%% of a CPU; "
                              "running it again" % (label, describe(rec), " " * 10,
                                                    100 * rec["other"]), flush=True)
                        again = run_one(cfg, client, name, size=size, conns=conns,
                                        rate=rate)
                        if "failed" not in again and again["other"] < rec["other"]:
                            rec = again
                        rec["retried"] = True
                except Unavailable as e:
                    unavailable[name] = str(e)
                    print("%s  unavailable: %s" % (label, e), flush=True)
                    continue
                rec["disturbed"] = "failed" not in rec and rec["other"] > cfg.noise_limit
                rec["round"] = rnd + 1
                runs.append(rec)
                print("%s  %s" % (label, describe(rec)), flush=True)


def summarize(runs, mode):
    groups = {}
    for r in runs:
        if r["mode"] == mode and "failed" not in r:
            groups.setdefault((r["server"], r["size"], r["conns"]), []).append(r)
    out = []
    for (name, size, conns), rs in groups.items():
        row = {"server": name, "size": size, "conns": conns, "rounds": len(rs),
               "rate": rs[0]["rate"], "rps_spread_pct": h.spread_pct([r["rps"] for r in rs]),
               "errors": sum(r["errors"] for r in rs),
               "incomplete": sum(r["incomplete"] for r in rs),
               "died": any(r.get("died") for r in rs),
               "disturbed": sum(1 for r in rs if r.get("disturbed")),
               "pinned": all(r["pinned"] for r in rs)}
        for key in ("rps", "p50", "p99", "p999", "util", "util_ticks", "cpu_us",
                    "stack_us", "rest_us", "stack_util", "client_busy", "cpu0_other",
                    "cpu1_other", "other"):
            row[key] = h.median([r.get(key) for r in rs])
        out.append(row)
    return out


def paired_ratios(runs, base, mode):
    """Median over rounds of base/peer (req/s) and base/peer (CPU us/req)."""
    index = {(r["server"], r["size"], r["conns"], r["round"]): r
             for r in runs if r["mode"] == mode and "failed" not in r}
    out = {}
    for (name, size, conns, rnd), peer in index.items():
        mine = index.get((base, size, conns, rnd))
        if name == base or mine is None:
            continue
        d = out.setdefault((size, conns, name), {"rps": [], "cpu": []})
        if peer["rps"]:
            d["rps"].append(mine["rps"] / peer["rps"])
        if peer["cpu_us"] and mine["cpu_us"]:
            d["cpu"].append(mine["cpu_us"] / peer["cpu_us"])
    return {k: {"rps": h.median(v["rps"]), "cpu": h.median(v["cpu"])}
            for k, v in out.items()}


# ---- printing ---------------------------------------------------------------

def fmt(v, spec="%.1f", none="-"):
    return none if v is None else spec % v


def fmt_us(v):
    if v is None:
        return "-"
    return "%.1f" % v if v < 100 else "{:,.0f}".format(v)


def print_closed(rows, servers, unavailable, rounds):
    print("\nClosed loop: median of %d round(s); server on CPU 0, client on CPU 1" % rounds)
    hdr = ("%-5s %5s %-12s %10s %5s %8s %8s %6s %8s %13s %5s %5s %6s" % (
        "size", "conns", "server", "req/s", "+-%", "p50 us", "p99 us", "srv%",
        "us/req", "stack+py", "cli%", "vs C", "other%"))
    print(hdr)
    print("-" * len(hdr))
    ref = {(r["size"], r["conns"]): r["rps"] for r in rows if r["server"] == "c-epoll"}
    order = {n: i for i, n in enumerate(servers)}
    for r in sorted(rows, key=lambda r: (r["size"], r["conns"], order.get(r["server"], 99))):
        split = ("%.2f+%.2f" % (r["stack_us"], r["rest_us"])
                 if r["stack_util"] else "")
        base = ref.get((r["size"], r["conns"]))
        note = ""
        if r["errors"] or r["incomplete"] or r["died"]:
            note = "  ! errors %d incomplete %d%s" % (
                r["errors"], r["incomplete"], " died" if r["died"] else "")
        if r["disturbed"]:
            note += "  ~ %d/%d run(s) disturbed" % (r["disturbed"], r["rounds"])
        if not r["pinned"]:
            note += "  ! server threads were not confined to their CPU"
        print("%-5s %5d %-12s %10s %5s %8s %8s %6s %8s %13s %5s %5s %6s%s" % (
            "%dB" % r["size"] if r["size"] < 1024 else "%dK" % (r["size"] // 1024),
            r["conns"], r["server"], "{:,.0f}".format(r["rps"]),
            fmt(r["rps_spread_pct"]), fmt_us(r["p50"]), fmt_us(r["p99"]),
            fmt(100 * r["util"], "%.0f"), fmt(r["cpu_us"], "%.2f"), split,
            fmt(100 * r["client_busy"], "%.0f"),
            fmt(r["rps"] / base if base else None, "%.2f"),
            fmt(100 * r["other"] if r["other"] is not None else None, "%.0f"),
            note))
    for name, why in unavailable.items():
        print("%-8s unavailable: %s" % (name, why))


def print_ratios(ratios, servers, base, title):
    peers = [s for s in servers if s != base]
    keys = sorted({(k[0], k[1]) for k in ratios})
    if not keys:
        return
    print("\n%s (median of per-round ratios; req/s: >1 = %s faster; "
          "CPU: <1 = %s cheaper)" % (title, base, base))
    print("%-5s %5s  %-6s " % ("size", "conns", "") +
          " ".join("%16s" % ("vs " + p) for p in peers))
    for size, conns in keys:
        for what, label in (("rps", "req/s"), ("cpu", "CPU")):
            cells = []
            for p in peers:
                v = ratios.get((size, conns, p), {}).get(what)
                cells.append("%16s" % (fmt(v, "%.2fx")))
            print("%-5d %5d  %-6s " % (size, conns, label) + " ".join(cells))


def print_open(rows, servers, rate_note):
    if not rows:
        print("\nOpen loop: " + rate_note)
        return
    print("\nOpen loop: %s" % rate_note)
    hdr = "%-12s %10s %8s %8s %8s %6s %8s %13s %5s %6s %s" % (
        "server", "achieved", "p50 us", "p99 us", "p999 us", "srv%", "us/req",
        "stack+py", "cli%", "other%", "note")
    print(hdr)
    print("-" * len(hdr))
    order = {n: i for i, n in enumerate(servers)}
    for r in sorted(rows, key=lambda r: order.get(r["server"], 99)):
        split = "%.2f+%.2f" % (r["stack_us"], r["rest_us"]) if r["stack_util"] else ""
        note = []
        if r["incomplete"] or r["rps"] < 0.97 * r["rate"]:
            note.append("SATURATED: below the offered rate, latency is queueing")
        if r["disturbed"]:
            note.append("disturbed %d/%d" % (r["disturbed"], r["rounds"]))
        if r["errors"]:
            note.append("errors %d" % r["errors"])
        print("%-12s %10s %8s %8s %8s %6s %8s %13s %5s %6s %s" % (
            r["server"], "{:,.0f}".format(r["rps"]), fmt_us(r["p50"]),
            fmt_us(r["p99"]), fmt_us(r["p999"]), fmt(100 * r["util"], "%.0f"),
            fmt(r["cpu_us"], "%.2f"), split, fmt(100 * r["client_busy"], "%.0f"),
            fmt(100 * r["other"] if r["other"] is not None else None, "%.0f"),
            "; ".join(note)))


def saturation_check(rows):
    """Say, for the C reference, which side ran out of CPU first."""
    lines = []
    for r in rows:
        if r["server"] != "c-epoll":
            continue
        client_side = r["client_busy"] + (r["cpu1_other"] or 0.0)
        if r["util"] >= 0.9:
            verdict = "the server is saturated"
            if r["client_busy"] >= 0.9:
                verdict += " (and so is the client: a 1:1 match on this loopback)"
        elif client_side >= 0.9:
            verdict = "CLIENT-BOUND: the C server had %.0f%% idle" % (100 - 100 * r["util"])
            if (r["cpu1_other"] or 0) > 0.05:
                verdict += ", others took %.0f%% of the client's CPU" % (
                    100 * r["cpu1_other"])
        else:
            verdict = "neither CPU full: disturbed or latency-bound"
        lines.append("  c-epoll %4d B x %4d: %s req/s, server CPU %.0f%%, client CPU "
                     "%.0f%% -> %s" % (r["size"], r["conns"], "{:,.0f}".format(r["rps"]),
                                       100 * r["util"], 100 * r["client_busy"], verdict))
    if lines:
        print("\nSaturation check (does the client saturate the C server?):")
        print("\n".join(lines))


# ---- main -------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 round, short windows (under ~2 minutes)")
    ap.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    ap.add_argument("--servers", default=",".join(ALL_SERVERS),
                    help="comma-separated subset of " + ",".join(ALL_SERVERS))
    ap.add_argument("--duration", type=float, help="measured seconds per run "
                    "(default 4, --quick 1.5)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds (default 1, --quick 0.5)")
    ap.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
    ap.add_argument("--sizes", default="64,1024", help="message sizes in bytes")
    ap.add_argument("--conns", default="100,1000", help="connection counts")
    ap.add_argument("--open-rate", type=float,
                    help="open-loop offered req/s (default: --open-frac of c-epoll's "
                         "closed-loop rate at the open-loop size/conns)")
    ap.add_argument("--open-frac", type=float, default=0.5,
                    help="default offered rate: this share of c-epoll's closed-loop "
                         "req/s (default 0.5) ...")
    ap.add_argument("--open-cap", type=float, default=0.8,
                    help="... but at most this share of the slowest server's, so "
                         "every server runs below saturation (default 0.8; 0: no cap)")
    ap.add_argument("--open-size", type=int, default=64)
    ap.add_argument("--open-conns", type=int, default=1000)
    ap.add_argument("--no-open", action="store_true", help="skip the open-loop section")
    ap.add_argument("--noise-limit", type=float, default=0.10,
                    help="a run is disturbed when others used more than this share "
                         "of CPU 0 or CPU 1 during its window (default 0.10)")
    ap.add_argument("--noise-retries", type=int, default=1,
                    help="repeat a disturbed run up to this many times, keeping the "
                         "least disturbed (default 1)")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--client-backend", default="auto", choices=("auto", "kernel", "uring"),
                    help="the load generator's transport (qstack load --backend); "
                         "auto (default): uring where io_uring works, else kernel")
    cfg = ap.parse_args(argv)
    cfg.rounds = cfg.rounds or (1 if cfg.quick else 3)
    cfg.duration = cfg.duration or (1.5 if cfg.quick else 4.0)
    cfg.warmup = cfg.warmup if cfg.warmup is not None else (0.5 if cfg.quick else 1.0)
    cfg.drain = 1.0 if cfg.quick else 2.0
    cfg.retry_budget = 6 if cfg.quick else 10  # bounds the time retries can add
    cfg.servers = [s.strip() for s in cfg.servers.split(",") if s.strip()]
    bad = [s for s in cfg.servers if s not in ALL_SERVERS]
    if bad:
        ap.error("unknown server(s): %s" % ", ".join(bad))
    cfg.sizes = [int(s) for s in cfg.sizes.split(",")]
    cfg.conns = [int(c) for c in cfg.conns.split(",")]
    if max(cfg.conns + [cfg.open_conns]) > 9000:
        ap.error("at most 9,000 connections: the client holds one fd per connection "
                 "and the limit here is 20,000 per process")
    return cfg


def open_rate(cfg, closed_rows):
    """The offered rate and a sentence saying where it came from."""
    if cfg.open_rate:
        return cfg.open_rate, "%s req/s (--open-rate)" % "{:,.0f}".format(cfg.open_rate)
    at = [r for r in closed_rows
          if r["size"] == cfg.open_size and r["conns"] == cfg.open_conns]
    ref = [r for r in at if r["server"] == "c-epoll"] or at
    if not ref:
        return None, "no closed-loop figure at %d B x %d to derive a rate from" % (
            cfg.open_size, cfg.open_conns)
    top = max(ref, key=lambda r: r["rps"])
    low = min(at, key=lambda r: r["rps"])
    rate = cfg.open_frac * top["rps"]
    how = "%.0f%% of %s's closed-loop rate" % (100 * cfg.open_frac, top["server"])
    # Below saturation for everyone, or the slow servers only show queueing.
    if cfg.open_cap and rate > cfg.open_cap * low["rps"]:
        rate = cfg.open_cap * low["rps"]
        how = "%.0f%% of the slowest (%s) closed-loop rate, capped from %s" % (
            100 * cfg.open_cap, low["server"], how)
    return rate, "%s req/s offered = %s" % ("{:,.0f}".format(rate), how)


def main(argv=None):
    cfg = parse_args(argv)
    started = time.monotonic()
    ncpu = os.cpu_count() or 1
    if max(cfg.server_cpu, cfg.client_cpu) >= ncpu:
        sys.exit("need CPUs %d and %d; this machine has %d" % (
            cfg.server_cpu, cfg.client_cpu, ncpu))
    # The runner itself wakes at the marks and reads /proc: keep it off the
    # server's CPU.
    os.sched_setaffinity(0, {cfg.client_cpu})
    cfg.client_backend = h.client_backend(cfg.client_backend)
    client = h.load_command() + ["--backend", cfg.client_backend]
    load_before = os.getloadavg()
    print("echo bench: servers %s, sizes %s, conns %s, %d round(s), client on %s, "
          "warm-up %.1f s, window %.1f s; load average %.2f" % (
              ",".join(cfg.servers), cfg.sizes, cfg.conns, cfg.rounds, cfg.client_backend,
              cfg.warmup,
              cfg.duration, load_before[0]), flush=True)
    if load_before[0] > 0.5:
        print("note: the machine is not idle (load %.2f); expect noise" % load_before[0])

    unavailable, runs = {}, []
    configs = [(s, c) for s in cfg.sizes for c in cfg.conns]
    run_rounds(cfg, client, cfg.servers, configs, unavailable, runs)
    closed = summarize(runs, "closed")

    rate, rate_note = (None, "skipped (--no-open)")
    if not cfg.no_open:
        rate, rate_note = open_rate(cfg, closed)
        if rate:
            run_rounds(cfg, client, cfg.servers, [(cfg.open_size, cfg.open_conns)],
                       unavailable, runs, rate_of=lambda s, c: rate)
    opened = summarize(runs, "open")
    ratios = {"closed": paired_ratios(runs, "qstack", "closed"),
              "open": paired_ratios(runs, "qstack", "open")}
    if not ratios["closed"]:
        ratios["closed"] = paired_ratios(runs, "c-epoll", "closed")
        ratio_base = "c-epoll"
    else:
        ratio_base = "qstack"

    print_closed(closed, cfg.servers, unavailable, cfg.rounds)
    saturation_check(closed)
    print_ratios(ratios["closed"], cfg.servers, ratio_base,
                 "%s ratios, closed loop" % ratio_base
                 + ("" if ratio_base == "qstack" else " (qstack unavailable)"))
    print_open(opened, cfg.servers, "%d B x %d conns, %s" % (
        cfg.open_size, cfg.open_conns, rate_note) if rate else rate_note)
    print_ratios(ratios["open"], cfg.servers, "qstack", "qstack ratios, open loop")
    if "qstack-uring" in cfg.servers:
        for mode in ("closed", "open"):
            ratios["uring-" + mode] = paired_ratios(runs, "qstack-uring", mode)
            print_ratios(ratios["uring-" + mode], cfg.servers, "qstack-uring",
                         "qstack-uring ratios, %s loop" % mode)
    elapsed = time.monotonic() - started
    print("\ntotal time %.0f s; load average now %.2f" % (elapsed, os.getloadavg()[0]))

    if cfg.json:
        doc = {
            "meta": {"argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "kernel": platform.release(), "cpus": ncpu,
                     "python": platform.python_version(), "elapsed_s": elapsed,
                     "client_backend": cfg.client_backend,
                     "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                     "config": {k: v for k, v in vars(cfg).items() if k != "json"}},
            "unavailable": unavailable,
            "closed": closed,
            "open": {"rate": rate, "how": rate_note, "rows": opened},
            "ratios": {mode: {"base": ratio_base if mode == "closed" else
                              "qstack-uring" if mode.startswith("uring") else "qstack",
                              "rows": [{"size": s, "conns": c, "peer": p, **v}
                                       for (s, c, p), v in sorted(r.items())]}
                       for mode, r in ratios.items()},
            "runs": runs,
        }
        with open(cfg.json, "w") as f:
            json.dump(doc, f, indent=1)
        print("wrote " + cfg.json)


if __name__ == "__main__":
    main()
