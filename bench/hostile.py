"""Hostile peers against a qstack server (issue 10), with a probe.

Each attack is held while a well-behaved client (high priority where a rule
exists) sends a message every 10 ms and times the reply.  Printed per
attack: connections held, probe p50/p99/max, server RSS (peak during the
attack, the whole process tree), and what the server said about it.

    python bench/hostile.py                  # all attacks, kernel backend
    python bench/hostile.py --attack slowloris --conns 8000

tests/test_hostile.py runs the same attacks, smaller, with bounds.
"""

import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# fixed:200 messages, byte 5 = 1: a request at level 0 (the iotep protocol)
FIXED = ["--framing", "fixed:200", "--priority", "offset=5,value=1,level=0"]
HIGH = b"\x00" * 5 + b"\x01" + b"h" * 194


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, config=None, env=None):
    """`qstack serve` on 127.0.0.1; returns (proc, port)."""
    port = free_port()
    cmd = [sys.executable, "-m", "qstack", "serve", *args, "--host", "127.0.0.1",
           "--port", str(port)]
    if config:
        fd, path = tempfile.mkstemp(suffix=".yaml")
        os.write(fd, config.encode())
        os.close(fd)
        cmd += ["--config", path]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode(errors="replace"))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not listen")


def rss_bytes(pid):
    """RSS of pid and its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return total


class Probe(threading.Thread):
    """One well-behaved connection: a message every `every` s, reply timed."""

    def __init__(self, port, msg, reply_len, every=0.01):
        super().__init__(daemon=True)
        self.port, self.msg, self.reply_len, self.every = port, msg, reply_len, every
        self.lat, self.failures, self.errors = [], 0, []
        self.stop = threading.Event()

    def run(self):
        s = None
        while not self.stop.is_set():
            try:
                if s is None:
                    s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                t0 = time.perf_counter()
                s.sendall(self.msg)
                got = 0
                while got < self.reply_len:
                    chunk = s.recv(self.reply_len - got)
                    if not chunk:
                        raise EOFError
                    got += len(chunk)
                self.lat.append(time.perf_counter() - t0)
            except (OSError, EOFError) as exc:
                self.failures += 1
                self.errors.append(f"{time.monotonic():.2f} {exc!r}")
                if s is not None:
                    s.close()
                s = None
            self.stop.wait(self.every)
        if s is not None:
            s.close()

    def summary(self):
        lat = sorted(self.lat)
        if not lat:
            return {"n": 0, "failures": self.failures, "errors": self.errors, "p50": None, "p99": None, "max": None}
        pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]   # noqa: E731
        return {"n": len(lat), "failures": self.failures, "errors": self.errors, "p50": pick(0.5),
                "p99": pick(0.99), "max": lat[-1]}


def connect_many(port, n, first=b"", rcvbuf=None):
    socks = []
    for _ in range(n):
        s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect(("127.0.0.1", port))
        if first:
            s.sendall(first)
        socks.append(s)
    return socks


def alive(socks):
    """How many of socks the server has not closed yet."""
    n = 0
    for s in socks:
        s.setblocking(False)
        try:
            n += s.recv(1 << 16, socket.MSG_PEEK) != b""
        except BlockingIOError:
            n += 1
        except OSError:
            pass
    return n


def slowloris(port, conns):
    """conns connections, each one byte into a 200-byte message."""
    return connect_many(port, conns, first=b"\x00")


def nonreaders(port, conns, seconds, line=b"x" * 1023 + b"\n"):
    """conns connections with a 4 KiB receive buffer sending 1 KiB lines
    for `seconds`, never reading."""
    socks = connect_many(port, conns, rcvbuf=4096)
    for s in socks:
        s.setblocking(False)
    end = time.monotonic() + seconds
    sent = 0
    while time.monotonic() < end:
        progress = False
        for s in socks:
            try:
                sent += s.send(line)
                progress = True
            except (BlockingIOError, OSError):
                pass
        if not progress:
            time.sleep(0.01)
    return socks, sent


def large_partials(port, conns, announce, send):
    """conns length:4 connections announcing `announce` bytes, sending `send`."""
    socks = connect_many(port, conns)
    chunk = b"L" * (1 << 16)
    for s in socks:
        s.setblocking(False)
    todo = {s: send for s in socks}
    for s in socks:
        s.send(struct.pack(">I", announce))
    end = time.monotonic() + 20
    while todo and time.monotonic() < end:
        progress = False
        for s in list(todo):
            try:
                n = s.send(chunk[:min(len(chunk), todo[s])])
                todo[s] -= n
                progress = True
                if todo[s] <= 0:
                    del todo[s]
            except BlockingIOError:
                pass
            except OSError:
                del todo[s]
        if not progress:
            time.sleep(0.01)
    return socks


CONFIG = """
native:
  buf_count: {buf_count}
  max_large_bytes: {max_large}
server:
  message_timeout: {mt}
  write_timeout: {wt}
"""


def run(attack, conns, hold, buf_count=8192, max_large=128 << 20, mt=30.0, wt=30.0,
        stack="thread"):
    """One attack, held `hold` s; returns a dict of figures."""
    framing = {"slowloris": FIXED, "nonreaders": ["--framing", "line"],
               "large": ["--framing", "length:4"]}[attack]
    probe_msg, reply_len = {"slowloris": (HIGH, 200),
                            "nonreaders": (b"probe\n", 6),
                            "large": (struct.pack(">I", 5) + b"probe", 9)}[attack]
    proc, port = start(["apps.echo:handle", *framing, "--stack", stack],
                       CONFIG.format(buf_count=buf_count, max_large=max_large, mt=mt, wt=wt))
    base = rss_bytes(proc.pid)
    probe = Probe(port, probe_msg, reply_len)
    probe.start()
    t0 = time.monotonic()
    if attack == "slowloris":
        socks = slowloris(port, conns)
    elif attack == "nonreaders":
        socks, _ = nonreaders(port, conns, hold)
    else:
        socks = large_partials(port, conns, 15 << 20, 14 << 20)
    held = alive(socks)
    peak = rss_bytes(proc.pid)
    while time.monotonic() - t0 < hold:
        peak = max(peak, rss_bytes(proc.pid))
        time.sleep(0.1)
    held_end = alive(socks)
    probe.stop.set()
    probe.join()
    for s in socks:
        s.close()
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    err = err.decode(errors="replace")
    said = [ln.split(": ", 1)[-1] for ln in err.splitlines()
            if "timeouts" in ln and "WARNING" in ln or "quota closes" in ln and "WARNING" in ln]
    return {"attack": attack, "conns": conns, "held_after_attack": held,
            "held_at_end": held_end, "probe": probe.summary(), "rss_base": base,
            "rss_peak": peak, "exit": proc.returncode, "said": said, "stderr": err}


def fmt(r):
    p = r["probe"]
    ms = lambda v: "-" if v is None else f"{v * 1e3:.1f} ms"   # noqa: E731
    return (f"{r['attack']:<11} conns {r['conns']:>5}  held {r['held_after_attack']:>5} -> "
            f"{r['held_at_end']:>5}  probe n {p['n']} fail {p['failures']} p50 {ms(p['p50'])} "
            f"p99 {ms(p['p99'])} max {ms(p['max'])}  RSS {r['rss_base'] / 2**20:.0f} -> "
            f"{r['rss_peak'] / 2**20:.0f} MiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", choices=["slowloris", "nonreaders", "large", "all"],
                    default="all")
    ap.add_argument("--conns", type=int, default=None)
    ap.add_argument("--hold", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="server.message_timeout and write_timeout (default: the defaults)")
    ap.add_argument("--stack", default="thread")
    a = ap.parse_args()
    plan = {"slowloris": 8192, "nonreaders": 60, "large": 60}
    for attack in plan if a.attack == "all" else [a.attack]:
        r = run(attack, a.conns or plan[attack], a.hold, mt=a.timeout, wt=a.timeout,
                stack=a.stack)
        print(fmt(r), flush=True)
        for line in r["said"]:
            print("    server said:", line)


if __name__ == "__main__":
    main()
