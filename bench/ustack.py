"""The user-space stack beside the kernel backend: echo req/s, and what each
held connection costs.

    .venv/bin/python bench/ustack.py [--rounds 3] [--echo-conns 50] [--duration 5]
        [--hold 40000] [--smp 4] [--json FILE] [--skip-echo] [--skip-hold]

Runs as root (it makes a network namespace with a TAP device, tests/netns.py:
198.18.0.1 is Linux, 198.18.0.2 is qstack's stack; nothing leaves it).

1. Echo, closed loop, 64-byte messages, --echo-conns connections, server on
   CPU 0 and `qstack load` on CPU 1, --rounds rounds each, in turn:
     kernel   qstack serve on 127.0.0.1 (epoll over kernel sockets, loopback)
     ustack   qstack serve --backend ustack on the TAP device, reached by
              Linux's TCP in the namespace (every frame crosses /dev/net/tun)
     dpdk     the same on DPDK's net_tap (when this build has DPDK)
   Prints req/s (median of rounds), p50/p99 and the ratio to kernel.

2. Held connections: --hold idle connections, opened by --smp load processes
   (each under the 20,000 files a process may have), once to the kernel
   backend (it needs one core process per 15,000 connections: --cores) and
   once to the ustack backend (one process).  Samples the server's RSS (its
   whole process tree), its open files, and the kernel's slab memory
   (/proc/meminfo Slab) with every connection up, against the server idle
   before.  The client's sockets are kernel sockets in both runs; with the
   kernel backend the slab also holds the server's half, so the server's
   kernel memory per connection is the difference of the two runs' slab.

Long: wrap it in ``flock /tmp/qstack-bench.lock`` on a shared machine.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import harness as h

sys.path.insert(0, os.path.join(h.REPO, "tests"))
from netns import KERNEL_IP, STACK_IP, TapNetns, why_not  # noqa: E402

PORT = 8000
EAL = "--no-huge -m 256 --no-pci --vdev=net_tap0,iface={iface}"
PY = h.VENV_PY if os.access(h.VENV_PY, os.X_OK) else sys.executable


def has_dpdk():
    sys.path.insert(0, h.REPO)
    from qstack.server import dpdk_library
    return dpdk_library() is not None


def serve_argv(backend, dev, *extra):
    argv = [PY, "-m", "qstack", "serve", "apps.echo:handle", "--port", str(PORT),
            "--log-level", "warning", *extra]
    if backend == "kernel":
        return argv + ["--host", h.LOOPBACK]
    argv += ["--backend", "ustack", "--ip", STACK_IP + "/24"]
    if backend == "dpdk":
        return argv + ["--driver", "dpdk", "--eal", EAL.format(iface=dev)]
    return argv + ["--tap", dev]


class Place:
    """Where a backend runs: loopback here, or a fresh namespace with a TAP."""

    def __init__(self, backend):
        self.backend = backend
        self.net = None if backend == "kernel" else TapNetns(create=backend == "ustack")
        self.host = h.LOOPBACK if backend == "kernel" else STACK_IP
        self._ctx = None

    def __enter__(self):
        if self.net is not None:
            self._ctx = self.net.entered()
            self._ctx.__enter__()
        return self

    def start(self, *extra, cpu=0, log_path=None):
        server = h.Server(self.backend, serve_argv(self.backend, self.net and self.net.dev,
                                                   *extra), cpu, log_path=log_path)
        if self.net is not None and not self.net.persistent:
            self.net.bring_up(server.proc)
        why = server.wait_port(PORT, timeout=60, host=self.host)
        if why:
            server.stop()
            raise RuntimeError(f"{self.backend} server {why}")
        return server

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        if self.net is not None:
            self.net.close()


# --- 1. echo ------------------------------------------------------------------------

def echo(args, backends):
    rows = {b: [] for b in backends}
    for r in range(args.rounds):
        for b in backends:
            with Place(b) as place:
                server = place.start(cpu=0)
                try:
                    res = h.run_client(h.load_command(), PORT, 1, conns=args.echo_conns,
                                       size=64, warmup=1, duration=args.duration,
                                       host=place.host)
                finally:
                    server.stop()
            rows[b].append(res)
            print(f"  round {r + 1} {b:<7} " + (
                res["error"] if "error" in res else
                f"{res['rps']:>10,.0f} req/s  p50 {res['p50_us']:.0f} us  "
                f"p99 {res['p99_us']:.0f} us  errors {res['errors']}"), flush=True)
    return rows


def echo_table(rows):
    med = {b: h.median([r.get("rps") for r in rs]) for b, rs in rows.items()}
    base = med.get("kernel")
    print("\n| backend | req/s (median) | spread | p50 us | p99 us | vs kernel |")
    print("|---|---|---|---|---|---|")
    for b, rs in rows.items():
        ok = [r for r in rs if "rps" in r]
        if not ok:
            print(f"| {b} | failed | | | | |")
            continue
        spread = h.spread_pct([r["rps"] for r in ok])
        ratio = f"{med[b] / base:.2f}x" if base else "-"
        print(f"| {b} | {med[b]:,.0f} | {'-' if spread is None else f'{spread:.0f}%'} | "
              f"{h.median([r['p50_us'] for r in ok]):.0f} | "
              f"{h.median([r['p99_us'] for r in ok]):.0f} | {ratio} |")


# --- 2. held connections -----------------------------------------------------------------

def slab_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_rss_fds(pid):
    rss = fds = 0
    for p in [pid] + [int(c) for c in _children(pid)]:
        try:
            with open(f"/proc/{p}/statm") as f:
                rss += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return rss, fds


def _children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += f.read().split()
    except OSError:
        pass
    return out + [g for c in out for g in _children(int(c))]


def hold(args, backend):
    cores = 1 if backend != "kernel" else math.ceil(args.hold / 15000)
    with Place(backend) as place:
        extra = ["--cores", str(cores)] if cores > 1 else []
        server = place.start(*extra, "--framing", "fixed:64", cpu=0)
        try:
            time.sleep(1.5)
            slab0 = slab_bytes()
            rss0, fds0 = tree_rss_fds(server.pid)
            ips = math.ceil(args.hold / 25000)      # 28,232 ports per source address
            src = []
            if backend != "kernel":                 # Linux's side gets the sources
                for i in range(ips):
                    place.net.run("ip", "addr", "add", f"198.18.0.{100 + i}/24", "dev",
                                  place.net.dev)
                src = ["--src", "198.18.0.100", "--allow-remote"]
            load = h.pin_prefix(1) + h.load_command() + [
                "--dest", f"{place.host}:{PORT}", "-c", str(args.hold), "--smp", str(args.smp),
                "--ips", str(ips), *src, "-s", str(args.setup), "-w", "600", "-e", "600",
                "-d", "1", "--connect-inflight", "512", "--quiet", "--log-duration", "1"]
            proc = subprocess.Popen(load, cwd=h.REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            best = None
            deadline = time.monotonic() + args.setup + 60
            for line in proc.stdout:          # "[ Ns] connected N ..." every second
                if "connected" in line and line.startswith("["):
                    n = int(line.split("connected")[1].split()[0].replace(",", ""))
                    if n >= args.hold:
                        time.sleep(2)          # settled: every handshake done
                        rss, fds = tree_rss_fds(server.pid)
                        best = {"conns": n, "rss": rss - rss0, "fds": fds, "fds_idle": fds0,
                                "slab": slab_bytes() - slab0, "cores": cores}
                        break
                if time.monotonic() > deadline:
                    break
            os.killpg(proc.pid, 9)
            proc.wait()
        finally:
            server.stop(timeout=20)
    return best


def hold_table(res, n):
    print(f"\n{n:,} idle connections held (server side):")
    print("| backend | server processes | open files | RSS per conn | kernel slab per conn "
          "(both ends) |")
    print("|---|---|---|---|---|")
    for b, r in res.items():
        if not r:
            print(f"| {b} | failed | | | |")
            continue
        print(f"| {b} | {r['cores']} | {r['fds']:,} | {r['rss'] / r['conns']:,.0f} B | "
              f"{r['slab'] / r['conns']:,.0f} B |")
    k, u = res.get("kernel"), res.get("ustack")
    if k and u:
        server_kernel = (k["slab"] / k["conns"]) - (u["slab"] / u["conns"])
        print(f"\nserver's kernel memory per connection, kernel backend: about "
              f"{server_kernel:,.0f} B (slab of the kernel run less the ustack run's, "
              f"which is the clients' alone)")
        print(f"total per connection on the server side: kernel backend "
              f"{k['rss'] / k['conns'] + server_kernel:,.0f} B, ustack "
              f"{u['rss'] / u['conns']:,.0f} B "
              f"({(k['rss'] / k['conns'] + server_kernel) / (u['rss'] / u['conns']):.1f}x)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--echo-conns", type=int, default=50)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--hold", type=int, default=40000)
    p.add_argument("--smp", type=int, default=4)
    p.add_argument("--setup", type=float, default=20.0)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--skip-echo", action="store_true")
    p.add_argument("--skip-hold", action="store_true")
    args = p.parse_args(argv)
    if why_not():
        print(f"bench/ustack.py: {why_not()}", file=sys.stderr)
        return 2
    backends = ["kernel", "ustack"] + (["dpdk"] if has_dpdk() else [])
    out = {"args": vars(args)}
    if not args.skip_echo:
        print(f"echo, closed loop, 64 B, {args.echo_conns} connections, {args.rounds} rounds")
        out["echo"] = echo(args, backends)
        echo_table(out["echo"])
    if not args.skip_hold:
        out["hold"] = {}
        for b in ("kernel", "ustack"):
            print(f"\nholding {args.hold:,} connections on {b} ...", flush=True)
            out["hold"][b] = hold(args, b)
        hold_table(out["hold"], args.hold)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
