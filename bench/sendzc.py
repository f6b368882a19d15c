"""Does a zero-copy send (IORING_OP_SEND_ZC) pay for large replies here?

    .venv/bin/python bench/sendzc.py [--sizes 4096,16384,65536,262144,1048576]
        [--seconds 2] [--rounds 3] [--depth 4] [--json FILE]

Issue 13 asked for send_zc "for large replies if it measures better".  This
answers the "if" for the uring backend's kernel, on this machine, before
any of it goes into qstack: bench/peers/sendzc_probe.c streams SIZE-byte
sends over one loopback TCP connection through io_uring, D in flight, the
sender pinned to CPU 0 and a reader thread to CPU 1, once with
IORING_OP_SEND and once with IORING_OP_SEND_ZC (each buffer reused only
after its notification).  Printed per size: throughput and the CPU each end
spent per MiB (RUSAGE_THREAD), the medians over rounds (modes interleaved),
and zc/send ratios; "both" is sender plus reader, what the machine paid.

Loopback caveat: the kernel copies a zero-copy skb's pages when it is
delivered to a local socket (skb_orphan_frags_rx), so the copy send_zc saves
at the sender is paid again at delivery; over a real NIC it is not.  What
this measures is what the uring backend's users on loopback, veth or a
container bridge would get.
"""
import argparse
import json
import subprocess
import sys

import harness as h


def run(binary, mode, size, seconds, depth):
    out = subprocess.run(
        h.pin_prefix("0,1") + [binary, "--mode", mode, "--size", str(size),
                               "--seconds", str(seconds), "--depth", str(depth),
                               "--sender-cpu", "0", "--reader-cpu", "1"],
        capture_output=True, text=True, timeout=seconds + 30)
    if out.returncode != 0:
        raise SystemExit("sendzc_probe %s %d: %s" % (mode, size, out.stderr.strip()))
    d = json.loads(out.stdout)
    mib = d["bytes"] / 2**20
    d["mib_s"] = mib / d["seconds"]
    d["send_us_mib"] = (d["user_s"] + d["sys_s"]) * 1e6 / mib
    d["read_us_mib"] = (d["reader_user_s"] + d["reader_sys_s"]) * 1e6 / mib
    d["both_us_mib"] = d["send_us_mib"] + d["read_us_mib"]
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4096,16384,65536,262144,1048576")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--json")
    a = ap.parse_args()
    try:
        sizes = [int(s) for s in a.sizes.split(",")]
    except ValueError:
        ap.error("--sizes: comma-separated byte counts, got %r" % a.sizes)
    binary = h.build("sendzc_probe", log=lambda m: print(m, file=sys.stderr))
    runs = {}
    for r in range(a.rounds):
        for size in sizes:
            modes = ("send", "zc") if r % 2 == 0 else ("zc", "send")
            for mode in modes:
                runs.setdefault((size, mode), []).append(run(binary, mode, size, a.seconds, a.depth))
    keys = ("mib_s", "send_us_mib", "read_us_mib", "both_us_mib")
    print("%9s %5s %10s %14s %14s %14s" % ("size", "mode", "MiB/s", "sender us/MiB",
                                           "reader us/MiB", "both us/MiB"))
    table = {}
    for size in sizes:
        for mode in ("send", "zc"):
            med = {k: h.median([d[k] for d in runs[(size, mode)]]) for k in keys}
            table[(size, mode)] = med
            print("%9d %5s %10.0f %14.1f %14.1f %14.1f" % (size, mode, *(med[k] for k in keys)))
        z, s = table[(size, "zc")], table[(size, "send")]
        print("%9s %5s %9.2fx %13.2fx %13.2fx %13.2fx" % ("", "zc/send", *(z[k] / s[k] for k in keys)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"%d/%s" % k: v for k, v in runs.items()}, f, indent=1)


if __name__ == "__main__":
    main()
