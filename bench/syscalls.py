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

--split then samples the server for 2 s more (`perf record`, 4999 Hz) and
splits its CPU per request into kernel and user space by where the samples
fell.  --spin makes the client poll instead of sleeping (`qstack load
--spin`), so that no server is charged for waking it.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import harness as h
from echo import ALL_SERVERS, Unavailable, server_argv


SPLIT_S = 2.0


def kernel_share(pid):
    """The share of pid's CPU samples in the kernel, over SPLIT_S seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        subprocess.run(["perf", "record", "-q", "-F", "4999", "-p", str(pid), "-o", data,
                        "--", "sleep", str(SPLIT_S)], capture_output=True, timeout=SPLIT_S + 30)
        rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso",
                              "--stdio"], capture_output=True, text=True, timeout=120)
    for line in rep.stdout.splitlines():
        f = line.split()
        if len(f) == 2 and f[0].endswith("%") and f[1] == "[kernel.kallsyms]":
            return float(f[0][:-1]) / 100
    return None


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
            "-r", "0", "--warmup", "1", "-d", str(args.duration + (SPLIT_S + 0.5) * args.split),
            "--drain", "1", "--log-duration", "0", "--quiet", "--json", "-"]
        client += ["--rate", str(args.rate)] if args.rate else ["--closed"]
        client += ["--spin", "100"] if args.spin else []
        load = subprocess.Popen(client, stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)                 # connected and warm: count from here
        perf = subprocess.run(
            ["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter,task-clock",
             "-p", str(srv.proc.pid), "--", "sleep", str(args.duration - 1)],
            capture_output=True, text=True, timeout=args.duration + 30)
        counts = {}
        for line in perf.stderr.splitlines():
            f = line.split(",")
            if len(f) > 2 and f[0].replace(".", "").isdigit():
                counts[f[2]] = float(f[0])
        if args.split:
            counts["kernel_share"] = kernel_share(srv.proc.pid)
        out, _ = load.communicate(timeout=args.duration + SPLIT_S + 60)
        doc = json.loads(out)
        rps = doc["window"]["responses_per_s"]
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
    ap.add_argument("--spin", action="store_true", help="the client polls, never sleeps")
    ap.add_argument("--split", action="store_true",
                    help="split CPU per request into kernel and user (perf record, 2 s more)")
    args = ap.parse_args()
    os.sched_setaffinity(0, {1})
    os.makedirs(os.path.join(h.BENCH, "results", "logs"), exist_ok=True)
    mode = "open %.0f req/s" % args.rate if args.rate else "closed"
    mode += ", the client spinning" if args.spin else ""
    print("%d B x %d conns, %s, %.1f s counted" % (args.size, args.conns, mode,
                                                     args.duration - 1))
    print("%-13s %10s %12s %10s%s" % ("server", "req/s", "syscalls/req", "CPU us/req",
                                      " %7s %7s" % ("kernel", "user") if args.split else ""))
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
        share = counts.get("kernel_share")
        split = ""
        if args.split:
            split = " %7.2f %7.2f" % (cpu * share, cpu * (1 - share)) if cpu and share else "       -"
        print("%-13s %10s %12s %10s%s" % (
            name, "{:,.0f}".format(rps) if rps else "-",
            "%.2f" % per if per else "-", "%.2f" % cpu if cpu else "-", split), flush=True)


if __name__ == "__main__":
    main()
