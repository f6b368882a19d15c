"""iotepserver under bursty IoT load: request latency with priority on and off.

    .venv/bin/python bench/iotep.py [--connections 20000] [--ratio 0.05]
        [--epoch 5] [--burst 2000] [--duration 20] [--rounds 1]
        [--cores N] [--workers W] [--batch B] [--stack auto|inline|thread]
        [--smp 2] [--redis 4] [--json FILE] [--quick]

QStack's headline benchmark, on this machine's loopback.  It starts
``--redis`` redis-servers (``qstack redis up`` in a private directory), then
for each round serves apps.iotepserver twice -- priority on (conf/
iotepserver.yaml as shipped: byte 5 == 0x01 is level 0) and priority off
(``--levels 1``: one FIFO for requests and heartbeats) -- each time under
the same ``qstack load --protocol iotep`` run: ``--connections`` device
connections opened over ``--setup`` seconds, each sending one 200-byte
message per ``--epoch``, in bursts of ``--burst`` connections at once, a
share ``--ratio`` of them requests (which alone get a 146-byte reply).  The
client measures each request's latency (send to reply) in HDR histograms;
heartbeats get no reply, so only requests have a latency.

What to read.  "req p99" side by side.  With priority off a request waits
behind every heartbeat queued before it; with priority on it is dispatched
before them, but it still shares the core with the heartbeat handlers
already in progress (up to --workers per core, each doing its Redis round
trips), so the gap grows with the burst size and with how close the offered
load (connections / epoch messages per second; 4,000 by default, below what
two shared CPUs serve here, while --epoch 2 overloads them) is to what the
cores can serve.  With the stack inline (the default on two CPUs), the hub
reads new sockets only after the up to native.batch (128) events it has
taken are done, so a request still unread waits behind up to that many
heartbeats: --batch 4 --workers 8 took request p99 from 1.3x to 3.6x better
than priority off here (docs/BENCHMARKS.md).  "replies/s" tells whether a run kept up; "lost" counts
requests whose reply never came (the load generator's incomplete + lost),
"redis err" the server's redis_errors (both should be 0).

Everything runs on this machine's CPUs together -- server cores, Redis and
the load processes -- so the absolute figures are this machine's, not
QStack's 10-million-connection testbed; the on/off ratio is the result.
Raw documents (the load generator's JSON per run) go to --json; server logs
and cdf.txt files to bench/results/.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

import harness as h

QSTACK = os.path.join(h.REPO, ".venv", "bin", "qstack")
CONF = os.path.join(h.REPO, "conf", "iotepserver.yaml")
RESULTS = os.path.join(h.BENCH, "results")
MODES = (("on", []), ("off", ["--levels", "1"]))


def qstack_cmd():
    return [QSTACK] if os.access(QSTACK, os.X_OK) else [sys.executable, "-m", "qstack"]


def check_load_available():
    res = subprocess.run(qstack_cmd() + ["load", "--help"], cwd=h.REPO,
                         capture_output=True, text=True)
    if res.returncode != 0 or "--protocol" not in res.stdout:
        sys.exit("bench/iotep.py needs `qstack load --protocol iotep`, which this "
                 "checkout does not have yet")


def write_config(path, redis_dir, redis_count, workers, batch=0, stack=None):
    with open(CONF) as f:
        cfg = yaml.safe_load(f)
    cfg["app"]["settings"].update(redis_dir=redis_dir, redis_count=redis_count)
    if workers:
        cfg["server"]["workers"] = workers
    if batch:
        cfg.setdefault("native", {})["batch"] = batch
    if stack:
        cfg.setdefault("layout", {})["stack"] = stack
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)


def redis_errors(log_path):
    """Sum of the cores' redis_errors from the server's exit log lines."""
    total = 0
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                if "counters: redis_errors" in line:
                    values = line.split("redis_errors", 1)[1].split()
                    total += sum(int(v) for v in values[1::2])
    except OSError:
        pass
    return total


def run_one(args, mode, extra, rnd, conf, cpus):
    port = h.free_port()
    tag = f"iotep-{mode}-r{rnd}"
    log_path = os.path.join(RESULTS, "logs", tag + ".log")
    serve = qstack_cmd() + ["serve", "--config", conf, "--port", str(port), *extra]
    if args.cores:
        serve += ["--cores", str(args.cores)]
    server = h.Server("iotepserver", serve, cpus, log_path=log_path)
    try:
        why = server.wait_port(port, timeout=30)
        if why:
            raise RuntimeError(f"iotepserver {why}:\n{server.log_tail()}")
        doc_path = os.path.join(RESULTS, tag + ".json")
        load = qstack_cmd() + [
            "load", "--protocol", "iotep", "--dest", f"{h.LOOPBACK}:{port}",
            "-c", str(args.connections), "-s", str(args.setup), "-w", str(args.wait),
            "-e", str(args.epoch), "-b", str(args.burst), "-r", str(args.ratio),
            "-d", str(args.duration), "--warmup", str(args.warmup),
            "--smp", str(args.smp), "--ips", str(args.ips), "--quiet",
            "--json", doc_path, "--cdf", os.path.join(RESULTS, tag + "-cdf.txt")]
        print(f"[{mode}] {' '.join(load)}", flush=True)
        limit = args.setup + args.wait + args.warmup + args.duration + 120
        wire_path = os.path.join(RESULTS, tag + "-wire.json")
        monitor = None
        if args.wire:
            monitor = subprocess.Popen(qstack_cmd() + [
                "monitor", "--port", str(port), "--warmup",
                str(args.setup + args.wait + args.warmup), "-d", str(args.duration),
                "--drain", "2", "--json", wire_path], cwd=h.REPO,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        res = subprocess.run(load, cwd=h.REPO, capture_output=True, text=True,
                             timeout=limit)
        if monitor is not None:
            _, err = monitor.communicate(timeout=60)
            if monitor.returncode not in (0, 1) or not os.path.exists(wire_path):
                raise RuntimeError(f"qstack monitor failed ({monitor.returncode}): {err}")
        if not os.path.exists(doc_path):
            raise RuntimeError(f"qstack load failed ({res.returncode}):\n"
                               f"{res.stderr[-2000:]}{res.stdout[-2000:]}")
        with open(doc_path) as f:
            doc = json.load(f)
        if monitor is not None:
            with open(wire_path) as f:
                doc["wire"] = json.load(f)
    finally:
        code = server.stop(timeout=15)
    doc["server"] = {"command": serve, "exit": code, "redis_errors": redis_errors(log_path)}
    doc["load_command"] = load
    return doc


def summary(doc):
    lat = doc["latency_ms"]["high"]
    wire = doc.get("wire", {}).get("latency_ns", {})
    ms = lambda v: None if v is None else v / 1e6      # noqa: E731
    return {
        "wire_p50": ms(wire.get("p50")), "wire_p99": ms(wire.get("p99")),
        "wire_drops": doc.get("wire", {}).get("kernel_drops"),
        "status": doc["status"],
        "connected": doc["connections"]["connected"],
        "offered": doc["window"]["offered_per_s"],
        "sent": doc["window"]["sent_per_s"],
        "served": doc["window"]["responses_per_s"],
        "p50": lat["p50"], "p99": lat["p99"], "p999": lat["p99.9"], "max": lat["max"],
        # requests with no reply: still missing after the drain, or on a
        # connection that dropped
        "lost": doc["window"]["incomplete"] + doc["messages"]["lost"],
        "redis_errors": doc["server"]["redis_errors"],
    }


def fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float) and digits == 0 and v.is_integer():
        v = int(v)
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def table(rows):
    out = ["| priority | connected | sent msg/s | replies/s | req p50 ms | req p99 ms "
           "| req p99.9 ms | req max ms | wire p50 ms | wire p99 ms | lost | redis err |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, s in rows:
        out.append(f"| {mode} | {fmt(s['connected'], 0)} | {fmt(s['sent'], 0)} | "
                   f"{fmt(s['served'], 0)} | {fmt(s['p50'])} | {fmt(s['p99'])} | "
                   f"{fmt(s['p999'])} | {fmt(s['max'])} | {fmt(s.get('wire_p50'))} | "
                   f"{fmt(s.get('wire_p99'))} | {fmt(s['lost'], 0)} | "
                   f"{fmt(s['redis_errors'], 0)} |")
    return "\n".join(out)


def median_summary(runs):
    keys = ("connected", "offered", "sent", "served", "p50", "p99", "p999", "max",
            "wire_p50", "wire_p99", "lost", "redis_errors")
    out = {"status": ",".join(sorted({r["status"] for r in runs}))}
    for k in keys:
        values = [r[k] for r in runs if r[k] is not None]
        out[k] = statistics.median(values) if values else None
    return out


def plot(docs, args, path):
    """Request latency of every round, on (red) against off (blue), and the
    no-Redis floor (gray): CDF and percentile spectrum; solid as the client
    measured it, dotted on the wire (qstack monitor) when it ran."""
    from qstack.loadgen.hist import Histogram
    from qstack.loadgen.report import draw_latency

    colors = {"on": "tab:red", "off": "tab:blue", "null": "tab:gray"}
    names = {"on": "priority on", "off": "priority off (--levels 1)",
             "null": "no Redis (apps.iotep_null)"}
    series, named = [], set()
    for d in docs:
        mode = d["mode"]
        if mode in colors:
            h = Histogram.from_json(d["doc"]["histograms"]["high"])
            label = names[mode] if mode not in named else "_nolegend_"   # one entry a mode
            series.append((label, h, colors[mode], "-"))
            wire = d["doc"].get("wire")
            if wire:            # qstack monitor's view: packet to reply packet
                label = f"{names[mode]}, on the wire" if mode not in named else "_nolegend_"
                series.append((label, Histogram.from_json(wire["hist"]), colors[mode], ":"))
            named.add(mode)
    draw_latency(series, f"iotepserver: {args.connections:,} connections, bursts of "
                         f"{args.burst:,}, {args.ratio:.0%} requests; {args.rounds} round(s)",
                 path, xlabel="client: from intended send time; wire: packet to reply packet")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=20000)
    ap.add_argument("--ratio", type=float, default=0.05, help="share of requests")
    ap.add_argument("--epoch", type=float, default=5.0,
                    help="seconds between two messages of one connection")
    ap.add_argument("--burst", type=int, default=2000,
                    help="connections that send at the same instant")
    ap.add_argument("--setup", type=float, default=10.0)
    ap.add_argument("--wait", type=float, default=2.0)
    ap.add_argument("--warmup", type=float, default=4.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cores", type=int, default=0,
                    help="server cores (0: the config's, 2)")
    ap.add_argument("--workers", type=int, default=0, help="per core (0: the config's)")
    ap.add_argument("--batch", type=int, default=0,
                    help="native.batch: events the hub takes from a ring at a time "
                         "(0: the config's, 128)")
    ap.add_argument("--stack", choices=("auto", "inline", "thread"), default=None,
                    help="layout.stack (default: the config's, auto)")
    ap.add_argument("--smp", type=int, default=2, help="load processes")
    ap.add_argument("--ips", type=int, default=4, help="client source addresses")
    ap.add_argument("--redis", type=int, default=4, help="redis-servers")
    ap.add_argument("--json", metavar="FILE", default=os.path.join(RESULTS, "iotep.json"))
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 2,000 connections, 5 s window")
    ap.add_argument("--plot", metavar="PNG",
                    help="draw the request latency CDFs, on against off (all rounds)")
    ap.add_argument("--null", action="store_true",
                    help="also serve apps.iotep_null (no Redis, replies at once) under "
                         "the same load: the floor the load shape itself sets here")
    ap.add_argument("--floor", action="store_true",
                    help="also measure the requests' own cost: requests only "
                         "(1,000 connections, 200/s, priority on), in bursts of "
                         "10 and of 100")
    ap.add_argument("--no-wire", dest="wire", action="store_false",
                    help="skip `qstack monitor` (the wire latency columns; it needs root)")
    args = ap.parse_args()
    if args.wire and os.geteuid() != 0:
        print("note: not root, so no `qstack monitor` (wire p50/p99 columns left out)")
        args.wire = False
    if args.quick:
        args.connections, args.setup, args.wait, args.warmup, args.duration = \
            2000, 2.0, 1.0, 1.0, 5.0
        args.burst = min(args.burst, 200)
    if shutil.which("redis-server") is None:
        sys.exit("bench/iotep.py needs redis-server (apt-get install redis-server)")
    check_load_available()
    os.makedirs(os.path.join(RESULTS, "logs"), exist_ok=True)
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))

    redis_dir = tempfile.mkdtemp(prefix="qsr-bench-", dir="/tmp")
    conf = os.path.join(redis_dir, "iotep.yaml")
    write_config(conf, redis_dir, args.redis, args.workers, args.batch, args.stack)
    subprocess.run(qstack_cmd() + ["redis", "up", str(args.redis), "--dir", redis_dir],
                   cwd=h.REPO, check=True)
    runs = {mode: [] for mode, _ in MODES}
    docs = []
    floors = []
    try:
        if args.floor:
            for burst in (10, 100):
                fl = argparse.Namespace(**{**vars(args), "connections": 1000, "ratio": 1.0,
                                           "burst": burst, "setup": 2.0})
                doc = run_one(fl, f"floor-b{burst}", [], 0, conf, cpus)
                docs.append({"mode": f"floor-b{burst}", "round": 0, "doc": doc})
                floors.append((f"requests only, bursts of {burst}", summary(doc)))
                print(f"[floor b{burst}] " + json.dumps(floors[-1][1]), flush=True)
        if args.null:
            doc = run_one(args, "null", ["apps.iotep_null:handle"], 0, conf, cpus)
            docs.append({"mode": "null", "round": 0, "doc": doc})
            floors.append(("no Redis (apps.iotep_null), same load", summary(doc)))
            print("[null] " + json.dumps(floors[-1][1]), flush=True)
        for rnd in range(args.rounds):
            order = MODES if rnd % 2 == 0 else MODES[::-1]
            for mode, extra in order:
                doc = run_one(args, mode, extra, rnd, conf, cpus)
                docs.append({"mode": mode, "round": rnd, "doc": doc})
                runs[mode].append(summary(doc))
                print(f"[{mode}] " + json.dumps(runs[mode][-1]), flush=True)
                time.sleep(2)            # let TIME_WAIT and Redis settle a little
    finally:
        subprocess.run(qstack_cmd() + ["redis", "down", "--dir", redis_dir], cwd=h.REPO)
        shutil.rmtree(redis_dir, ignore_errors=True)

    rows = [(mode, median_summary(runs[mode])) for mode, _ in MODES]
    print()
    print(f"iotepserver, {args.connections:,} connections, {args.ratio:.0%} requests, "
          f"one 200-byte message per connection every {args.epoch:g} s in bursts of "
          f"{args.burst:,}; {args.cores or 'configured'} server cores "
          f"(workers {args.workers or 'as configured'}, batch {args.batch or 'as configured'}, "
          f"stack {args.stack or 'as configured'}), {args.redis} redis-servers, "
          f"{args.smp} load processes; median of {args.rounds} round(s):")
    print()
    print(table(rows))
    on, off = dict(rows)["on"]["p99"], dict(rows)["off"]["p99"]
    if on and off:
        print(f"\nrequest p99, priority off / on: {off / on:.1f}x")
    if floors:
        print("\nFloors (priority on): the requests' own cost with no heartbeats "
              "(1,000 connections, 200 requests/s), and the load shape's own cost "
              "with no Redis (--null):\n")
        print(table(floors))
    if args.plot:
        plot(docs, args, args.plot)
        print(f"plot: {os.path.relpath(args.plot, h.REPO)}")
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "rows": dict(rows), "runs": docs}, f, indent=1)
    print(f"raw documents: {os.path.relpath(args.json, h.REPO)}")


if __name__ == "__main__":
    main()
