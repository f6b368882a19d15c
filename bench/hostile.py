"""Hostile peers against a qstack server (issue 10), with a probe; and the
same attacks against gevent's StreamServer and a uvloop Protocol.

Each attack is held while a well-behaved client (high priority where a rule
exists) sends a message every 10 ms on a connection of its own and times
each reply.  The attack runs in a child process (its send loops never share
a GIL with the probe); the probe runs in a thread of this one.  Printed per
attack and server: connections held once they are up and when the hold
ends (by their TCP state: a reset one is not held), probe p50/p99/max and
failures (no reply within 2 s), server RSS (its whole process tree: before,
and the peak during the attack), and what the server said about it.  The
hold lasts --hold seconds from when the attack's connections are up, or
until the attack is over if that is later
(the large-message attack sends for up to ATTACK_LIMIT s while a server
does not read it).

    python bench/hostile.py                          # qstack, kernel backend (epoll)
    python bench/hostile.py --server qstack,gevent,uvloop --hold 8
    python bench/hostile.py --backend uring          # qstack on io_uring
    python bench/hostile.py --backend ustack         # qstack over TAP (root)
    python bench/hostile.py --attack slowloris --conns 8000

The peers (bench/peers/gevent_echo.py, uvloop_echo.py with --framing) echo
whole messages of the same framing as the probe and have no caps or
timeouts: what a user's first server would be.  tests/test_hostile.py runs
the same attacks, smaller, with bounds.  On a shared machine wrap it in
``flock /tmp/qstack-bench.lock``.
"""

import argparse
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(ROOT, "bench", "peers")
LOOPBACK = "127.0.0.1"

# fixed:200 messages, byte 5 = 1: a request at level 0 (the iotep protocol)
FIXED = ["--framing", "fixed:200", "--priority", "offset=5,value=1,level=0"]
HIGH = b"\x00" * 5 + b"\x01" + b"h" * 194

FRAMING = {"slowloris": "fixed:200", "nonreaders": "line", "large": "length:4"}
QSTACK_ARGS = {"slowloris": FIXED, "nonreaders": ["--framing", "line"],
               "large": ["--framing", "length:4"]}
PROBE = {"slowloris": (HIGH, 200), "nonreaders": (b"probe\n", 6),
         "large": (struct.pack(">I", 5) + b"probe", 9)}
PLAN = {"slowloris": 8192, "nonreaders": 60, "large": 60}   # connections per attack
ATTACK_LIMIT = 30.0     # s: no attack loop runs longer than this


def free_port():
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_listening(proc, host, port, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode(errors="replace"))
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"server did not listen on {host}:{port}")


def start(args, config=None, env=None, tap=None, backend="kernel"):
    """`qstack serve`: on 127.0.0.1 and a free port over kernel sockets
    (backend kernel or uring), or (tap = the device of a namespace the
    caller entered) on the user-space stack at STACK_IP:8000.
    Returns (proc, host, port)."""
    if tap is None:
        host, port = LOOPBACK, free_port()
        where = ["--host", host, "--port", str(port), "--backend", backend]
    else:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from netns import STACK_IP
        host, port = STACK_IP, 8000
        where = ["--port", str(port), "--backend", "ustack", "--tap", tap,
                 "--ip", STACK_IP + "/24"]
    cmd = [sys.executable, "-m", "qstack", "serve", *args, *where]
    if config:
        fd, path = tempfile.mkstemp(suffix=".yaml")
        os.write(fd, config.encode())
        os.close(fd)
        cmd += ["--config", path]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    wait_listening(proc, host, port)
    return proc, host, port


def start_peer(name, framing):
    """A peer echo server (gevent | uvloop) on 127.0.0.1; (proc, host, port)."""
    port = free_port()
    cmd = [sys.executable, os.path.join(PEERS, f"{name}_echo.py"), "--host", LOOPBACK,
           "--port", str(port), "--framing", framing]
    proc = subprocess.Popen(cmd, cwd=PEERS, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_listening(proc, LOOPBACK, port)
    return proc, LOOPBACK, port


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

    def __init__(self, addr, msg, reply_len, every=0.01, timeout=2.0):
        super().__init__(daemon=True)
        self.addr, self.msg, self.reply_len, self.every = addr, msg, reply_len, every
        self.timeout = timeout
        self.lat, self.failures, self.errors = [], 0, []
        self.stop = threading.Event()

    def run(self):
        s = None
        while not self.stop.is_set():
            try:
                if s is None:
                    s = socket.create_connection(self.addr, timeout=self.timeout)
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
            return {"n": 0, "failures": self.failures, "errors": self.errors, "p50": None,
                    "p99": None, "max": None}
        pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]   # noqa: E731
        return {"n": len(lat), "failures": self.failures, "errors": self.errors,
                "p50": pick(0.5), "p99": pick(0.99), "max": lat[-1]}


# ---------------------------------------------------------------- the attacks
# They run in the attacker process (attacker_main), bounded in connections
# and in time.

def connect_many(addr, n, first=b"", rcvbuf=None):
    socks = []
    for _ in range(n):
        s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(10)
        s.connect(addr)
        if first:
            s.sendall(first)
        socks.append(s)
    return socks


TCP_ESTABLISHED = 1


def alive(socks):
    """How many of socks the server has not closed (nor reset) yet: their
    TCP state, not a peek (unread replies stay readable after a reset)."""
    n = 0
    for s in socks:
        try:
            n += s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_ESTABLISHED
        except OSError:
            pass
    return n


def slowloris(addr, conns, seconds, up):
    """conns connections, each one byte into a 200-byte message."""
    socks = connect_many(addr, conns, first=b"\x00")
    up(socks)
    return socks


def nonreaders(addr, conns, seconds, up, line=b"x" * 1023 + b"\n"):
    """conns connections with a 4 KiB receive buffer sending 1 KiB lines
    for `seconds`, never reading."""
    socks = connect_many(addr, conns, rcvbuf=4096)
    up(socks)
    for s in socks:
        s.setblocking(False)
    end = time.monotonic() + min(seconds, ATTACK_LIMIT)
    while time.monotonic() < end:
        progress = False
        for s in socks:
            try:
                s.send(line)
                progress = True
            except OSError:
                pass
        if not progress:
            time.sleep(0.01)
    return socks


def large_partials(addr, conns, seconds, up, announce=15 << 20, send=14 << 20):
    """conns length:4 connections announcing `announce` bytes, sending `send`
    (for as long as the server reads them, ATTACK_LIMIT at most)."""
    socks = connect_many(addr, conns)
    up(socks)
    chunk = b"L" * (1 << 16)
    for s in socks:
        s.sendall(struct.pack(">I", announce))
        s.setblocking(False)
    todo = {s: send for s in socks}
    end = time.monotonic() + ATTACK_LIMIT
    while todo and time.monotonic() < end:
        progress = False
        for s in list(todo):
            try:
                todo[s] -= s.send(chunk[:min(len(chunk), todo[s])])
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


ATTACKS = {"slowloris": slowloris, "nonreaders": nonreaders, "large": large_partials}


def attacker_main(a):
    """The attacker process: prints {"held": n} once its connections are up,
    {"done": n} when the attack is over, then a count for every line read
    on stdin; closes everything at EOF."""
    def up(socks):
        print(json.dumps({"held": alive(socks)}), flush=True)
    socks = ATTACKS[a.attacker]((a.host, a.port), a.conns, a.seconds, up)
    print(json.dumps({"done": alive(socks)}), flush=True)
    for _ in sys.stdin:
        print(json.dumps({"held": alive(socks)}), flush=True)
    for s in socks:
        s.close()


class Attacker:
    def __init__(self, attack, addr, conns, seconds):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--attacker", attack, "--host",
             addr[0], "--port", str(addr[1]), "--conns", str(conns), "--seconds",
             str(seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.first = self.done = None
        self.t_up = None               # when its connections were up
        self._reader = threading.Thread(target=self._read_first, daemon=True)
        self._reader.start()

    def _read_first(self):
        line = self.proc.stdout.readline()
        self.t_up = time.monotonic()
        self.first = json.loads(line)["held"] if line else -1
        line = self.proc.stdout.readline() if line else ""
        self.done = json.loads(line)["done"] if line else -1

    def ready(self):
        return self.done is not None

    def count(self):
        self._reader.join()
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        return json.loads(line)["held"] if line else -1

    def close(self):
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- one run

CONFIG = """
native:
  buf_count: {buf_count}
  max_large_bytes: {max_large}
server:
  message_timeout: {mt}
  write_timeout: {wt}
"""


def run(attack, conns, hold, buf_count=8192, max_large=128 << 20, mt=30.0, wt=30.0,
        stack="thread", server="qstack", tap=None, backend="kernel"):
    """One attack, held `hold` s, against `server` (qstack, gevent or
    uvloop; qstack on `backend` kernel or uring, or on the user-space stack
    when `tap` names the device of a namespace the caller entered).
    Returns a dict of figures."""
    if server == "qstack":
        proc, host, port = start(
            ["apps.echo:handle", *QSTACK_ARGS[attack], "--stack", stack],
            CONFIG.format(buf_count=buf_count, max_large=max_large, mt=mt, wt=wt), tap=tap,
            backend=backend)
    else:
        proc, host, port = start_peer(server, FRAMING[attack])
    try:
        base = rss_bytes(proc.pid)
        msg, reply_len = PROBE[attack]
        probe = Probe((host, port), msg, reply_len)
        probe.start()
        t0 = time.monotonic()
        att = Attacker(attack, (host, port), conns, hold)
        peak = base
        # held `hold` s from when the attack's connections are up (8,192
        # take a second or two to open), and until the attack is over
        while not att.ready() or time.monotonic() - (att.t_up or t0) < hold:
            peak = max(peak, rss_bytes(proc.pid))
            time.sleep(0.1)
            if time.monotonic() - t0 > hold + ATTACK_LIMIT + 30:
                break                   # the attacker is stuck: report what we have
        held = att.first if att.first is not None else -1
        held_end = att.count() if att.done is not None and att.done >= 0 else -1
        probe.stop.set()
        probe.join()
        att.close()
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    err = err.decode(errors="replace")
    said = [ln.split(": ", 1)[-1] for ln in err.splitlines()
            if "WARNING" in ln and ("timeouts" in ln or "quota closes" in ln
                                    or "protocol errors" in ln)]
    return {"attack": attack, "server": server if tap is None else "qstack-ustack",
            "conns": conns, "held_up": held, "held_at_end": held_end,
            "probe": probe.summary(), "rss_base": base, "rss_peak": peak,
            "exit": proc.returncode, "said": said, "stderr": err}


def fmt(r):
    p = r["probe"]
    ms = lambda v: "-" if v is None else f"{v * 1e3:.1f} ms"   # noqa: E731
    return (f"{r['attack']:<11} {r['server']:<13} conns {r['conns']:>5}  held "
            f"{r['held_up']:>5} -> {r['held_at_end']:>5}  probe n {p['n']} fail "
            f"{p['failures']} p50 {ms(p['p50'])} p99 {ms(p['p99'])} max {ms(p['max'])}  RSS "
            f"{r['rss_base'] / 2**20:.0f} -> {r['rss_peak'] / 2**20:.0f} MiB")


@contextlib.contextmanager
def namespace(backend):
    """None on kernel sockets; for ustack a TAP device in a namespace of
    our own, entered for the block (tests/netns.py)."""
    if backend != "ustack":
        yield None
        return
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from netns import entered_tap, why_not
    if why_not():
        sys.exit(f"--backend ustack: {why_not()}")
    with entered_tap() as dev:
        yield dev


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", choices=[*ATTACKS, "all"], default="all")
    ap.add_argument("--server", default="qstack",
                    help="comma-separated: qstack, gevent, uvloop (default qstack)")
    ap.add_argument("--backend", choices=["kernel", "uring", "ustack"], default="kernel",
                    help="qstack's backend (the peers always use kernel sockets)")
    ap.add_argument("--conns", type=int, default=None)
    ap.add_argument("--hold", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="server.message_timeout and write_timeout (default: the defaults)")
    ap.add_argument("--stack", default="thread")
    ap.add_argument("--json", help="append each run's figures to this file")
    # the attacker process (internal)
    ap.add_argument("--attacker", choices=list(ATTACKS), help=argparse.SUPPRESS)
    ap.add_argument("--host", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.attacker:
        return attacker_main(a)
    servers = a.server.split(",")
    with namespace(a.backend) as tap:
        for attack in ATTACKS if a.attack == "all" else [a.attack]:
            for server in servers:
                if tap is not None and server != "qstack":
                    continue
                r = run(attack, a.conns or PLAN[attack], a.hold, mt=a.timeout, wt=a.timeout,
                        stack=a.stack, server=server, tap=tap, backend=a.backend)
                print(fmt(r), flush=True)
                for line in r["said"]:
                    print("    server said:", line)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps({k: v for k, v in r.items() if k != "stderr"})
                                + "\n")


if __name__ == "__main__":
    main()
