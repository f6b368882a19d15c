"""Syscalls per request of echo servers, counted by the kernel.

    .venv/bin/python bench/syscalls.py [--servers qstack,qstack-uring,c-epoll,c-uring,uvloop]
        [--size 64] [--conns 100] [--duration 3] [--rate R]

Each server (bench/echo.py's, pinned to CPU 0) echoes `qstack load` (CPU 1:
closed loop, or open loop at --rate req/s) while `perf stat -e
raw_syscalls:sys_enter` counts every syscall the server's threads enter
during the measured window; the load generator counts the requests
answered in the same window.  Printed per server: requests/s, syscalls per
request, and the server's CPU microseconds per request (perf's task-clock).
The counting costs nothing measurable (a tracepoint counter, not strace).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import harness as h
from echo import ALL_SERVERS, Unavailable, server_argv


def measure(name, args):
    port = h.free_port()
    srv = h.Server(name, server_argv(name, port), 0,
                   log_path=os.path.join(h.BENCH, "results", "logs", name + ".log"))
    try:
        why = srv.wait_port(port)
        if why:
            raise Unavailable(why)
        client = h.pin_prefix(1) + h.load_command() + [
            "--backend", h.client_backend(args.client_backend),
            "--dest", "%s:%d" % (h.LOOPBACK, port), "-c", str(args.conns),
            "-l", str(args.size), "-s", "0", "-w", "0.5", "--connect-inflight", "64",
            "-r", "0", "--warmup", "1", "-d", str(args.duration), "--drain", "1",
            "--log-duration", "0", "--quiet", "--json", "-"]
        client += ["--rate", str(args.rate)] if args.rate else ["--closed"]
        load = subprocess.Popen(client, stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)                 # connected and warm: count from here
        perf = subprocess.run(
            ["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter,task-clock",
             "-p", str(srv.proc.pid), "--", "sleep", str(args.duration - 1)],
            capture_output=True, text=True, timeout=args.duration + 30)
        out, _ = load.communicate(timeout=args.duration + 60)
        doc = json.loads(out)
        rps = doc["window"]["responses_per_s"]
        counts = {}
        for line in perf.stderr.splitlines():
            f = line.split(",")
            if len(f) > 2 and f[0].replace(".", "").isdigit():
                counts[f[2]] = float(f[0])
        return rps, counts, doc
    finally:
        srv.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", default="qstack,qstack-uring,c-epoll,c-uring,uvloop")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--conns", type=int, default=100)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--rate", type=float, default=0.0, help="open loop at this req/s")
    ap.add_argument("--client-backend", default="auto", choices=("auto", "kernel", "uring"),
                    help="qstack load --backend (auto: uring where io_uring works)")
    args = ap.parse_args()
    os.sched_setaffinity(0, {1})
    os.makedirs(os.path.join(h.BENCH, "results", "logs"), exist_ok=True)
    mode = "open %.0f req/s" % args.rate if args.rate else "closed"
    print("%d B x %d conns, %s, %.1f s counted" % (args.size, args.conns, mode,
                                                     args.duration - 1))
    print("%-13s %10s %12s %10s" % ("server", "req/s", "syscalls/req", "CPU us/req"))
    for name in [s for s in args.servers.split(",") if s]:
        if name not in ALL_SERVERS:
            sys.exit(f"unknown server {name!r}")
        try:
            rps, counts, _ = measure(name, args)
        except Unavailable as exc:
            print("%-13s unavailable: %s" % (name, exc))
            continue
        secs = args.duration - 1
        sc = counts.get("raw_syscalls:sys_enter")
        clock = counts.get("task-clock")          # ms
        per = sc / (rps * secs) if sc and rps else None
        cpu = clock * 1e3 / (rps * secs) if clock and rps else None
        print("%-13s %10s %12s %10s" % (
            name, "{:,.0f}".format(rps) if rps else "-",
            "%.2f" % per if per else "-", "%.2f" % cpu if cpu else "-"), flush=True)


if __name__ == "__main__":
    main()
