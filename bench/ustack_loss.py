"""Latency tails of the user-space stack under loss: both ends on qstack's
TCP over DPDK's net_memif, with faults injected at both ends.

    .venv/bin/python bench/ustack_loss.py [--seeds 1-7] [--conns 2000] [--json FILE]

The set-up of tests/test_load_backends.py::test_ustack_client_over_memif,
without its bounds:
- the server (`qstack serve --backend ustack --driver memif`) drops 1% of
  its frames, duplicates 1%, reorders 2% and corrupts 0.5%;
- the load generator (`qstack load --backend ustack --driver memif`) drops
  1% of its frames;
- --conns connections each send 3,000-byte messages (three segments) for
  1 s, and up to 15 s more are allowed for the answers.

One run per fault seed. Printed per seed, and at the end the totals and
the range of each figure over the seeds:
- requests, and how many were never answered;
- latency p90, p99, p99.9 and max, counted from each request's intended
  send time;
- the server's segments retransmitted and its tail loss probes (from its
  shutdown line).

What this shows is recovery from loss. With 1% loss, a short message whose
last segment is lost has no duplicate ACKs to repair it, so it waits for a
tail loss probe (RFC 8985) or for the retransmission timeout.

Needs root and a build with DPDK (libdpdk-dev). On a shared machine, wrap
it in ``flock /tmp/qstack-bench.lock``.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
PY = os.path.join(REPO, ".venv", "bin", "python")
SERVER_IP, CLIENT_IP = "198.18.0.2", "198.18.1.1"
FAULTS = "ustack:\n  loss: 0.01\n  dup: 0.01\n  reorder: 0.02\n  corrupt: 0.005\n  fault_seed: %d\n"


def seeds(text):
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def after(text, word):
    """The number just before `word` in text (the server's shutdown line)."""
    head = text.split(" " + word)[0]
    return int(head.rsplit(" ", 1)[1]) if head != text else None


def run(seed, conns):
    from qstack import memif
    with tempfile.TemporaryDirectory() as tmp:
        sock, conf = os.path.join(tmp, "memif.sock"), os.path.join(tmp, "faults.yaml")
        with open(conf, "w") as f:
            f.write(FAULTS % seed)
        srv = subprocess.Popen(
            [PY, "-m", "qstack", "serve", "tests.apps.loadgen_apps:counting", "--config", conf,
             "--framing", "fixed:3000", "--priority", "offset=5,value=0x01", "--backend",
             "ustack", "--driver", "memif", "--memif", sock, "--ip", SERVER_IP + "/16",
             "--port", "8000"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not memif.listening(sock):
                if srv.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start: " + srv.stderr.read()[-500:])
                time.sleep(0.05)
            out = os.path.join(tmp, "out.json")
            res = subprocess.run(
                [PY, "-m", "qstack", "load", "--backend", "ustack", "--driver", "memif",
                 "--memif", sock, "--ip", CLIENT_IP + "/16", "--loss", "0.01", "--dest",
                 SERVER_IP + ":8000", "-c", str(conns), "-s", "0.5", "-w", "3", "-e", "0.5",
                 "-b", str(max(1, conns // 10)), "--drain", "15", "--connect-timeout", "30",
                 "-l", "3000", "-r", "0.3", "-d", "1", "--json", out, "-q"],
                cwd=REPO, capture_output=True, text=True, timeout=150)
            if res.returncode != 0:
                raise SystemExit(f"qstack load exit {res.returncode}: {res.stderr[-500:]}")
            with open(out) as f:
                doc = json.load(f)
        finally:
            if srv.poll() is None:
                srv.send_signal(signal.SIGTERM)
            err = srv.communicate(timeout=60)[1]
    m, lat = doc["messages"], doc["latency_ms"]["all"]
    return {"seed": seed, "sent": m["sent"], "unanswered": m["sent"] - m["responses"],
            "p90": lat["p90"], "p99": lat["p99"], "p99.9": lat["p99.9"], "max": lat["max"],
            "rexmit": after(err, "retransmitted"), "tlp": after(err, "tail probes")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1-7", help="fault seeds: 1-7, or 1,4,9")
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--json", help="write every run's figures here")
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from netns import why_not
    from qstack.loadgen.engine import dpdk_library
    if why_not() or dpdk_library() is None:
        sys.exit(why_not() or "this build has no DPDK driver (no libdpdk found)")
    print("%5s %7s %10s %8s %8s %8s %8s %8s %6s" % (
        "seed", "sent", "unanswered", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "rexmit", "tlp"))
    runs = []
    for seed in seeds(a.seeds):
        r = run(seed, a.conns)
        runs.append(r)
        print("%5d %7d %10d %8.1f %8.1f %8.1f %8.1f %8s %6s" % (
            seed, r["sent"], r["unanswered"], r["p90"], r["p99"], r["p99.9"], r["max"],
            r["rexmit"], r["tlp"]), flush=True)
    span = {k: (min(r[k] for r in runs), max(r[k] for r in runs))
            for k in ("p90", "p99", "p99.9", "max")}
    print("all %d requests, %d unanswered; over the seeds: p90 %.0f-%.0f ms, p99 %.0f-%.0f ms, "
          "p99.9 %.0f-%.0f ms, max %.0f-%.0f ms" % (
              sum(r["sent"] for r in runs), sum(r["unanswered"] for r in runs),
              *span["p90"], *span["p99"], *span["p99.9"], *span["max"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
