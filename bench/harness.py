"""Shared machinery for the side-by-side benchmarks in bench/.

Builds the C reference server (bench/peers/epoll_echo.c), starts a server
pinned to one CPU and stops it (process group: SIGTERM, then SIGKILL), runs
the load generator -- `qstack load`, the same native engine users run (see
docs/LOAD.md) -- pinned to another CPU, and samples the server's CPU time per
thread exactly when the generator opens and closes its measured window
(`qstack load --marks` prints "#start" and "#end" on stdout for that).

CPU time comes from /proc/PID/task/TID/schedstat (nanoseconds) when the
kernel provides it, else from utime+stime in /proc/PID/task/TID/stat (clock
ticks, 10 ms); both are recorded. The server's whole process tree is
counted, so a supervisor that forks workers is measured in full.
"""
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
PEERS = os.path.join(BENCH, "peers")
BIN = os.path.join(BENCH, "bin")
VENV_PY = os.path.join(REPO, ".venv", "bin", "python")
LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# binary name -> its C sources in bench/peers/
NATIVE = {
    "epoll_echo": ["epoll_echo.c"],
    "uring_echo": ["uring_echo.c"],
    "sendzc_probe": ["sendzc_probe.c"],
}
LIBS = {"uring_echo": ["-luring"], "sendzc_probe": ["-luring", "-lpthread"]}   # beyond -lm


# ---- building ---------------------------------------------------------------

def build(name, log=print):
    """Compile bench/bin/NAME with gcc -O2 when a source is newer; return path."""
    out = os.path.join(BIN, name)
    srcs = [os.path.join(PEERS, s) for s in NATIVE[name]]
    deps = srcs
    if os.path.exists(out):
        built = os.path.getmtime(out)
        if all(os.path.getmtime(d) <= built for d in deps if os.path.exists(d)):
            return out
    os.makedirs(BIN, exist_ok=True)
    cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-o", out] + srcs + ["-lm"] + LIBS.get(name, [])
    log("building " + os.path.relpath(out, REPO))
    subprocess.run(cmd, check=True)
    return out


# ---- ports and processes ----------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def pin_prefix(cpu):
    return ["taskset", "-c", str(cpu)]


class Server:
    """A server process in its own process group, pinned with taskset."""

    def __init__(self, name, argv, cpu, cwd=REPO, log_path=None):
        self.name = name
        self.log_path = log_path
        log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            pin_prefix(cpu) + argv, cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if log_path:
            log.close()

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def wait_port(self, port, timeout=15.0, host=LOOPBACK):
        """None once something accepts on the port, else why not (a string)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return "exited with code %s before listening" % self.proc.returncode
            try:
                with socket.create_connection((host, port), timeout=0.25):
                    return None
            except OSError:
                time.sleep(0.02)
        return "did not listen on port %d within %.0f s" % (port, timeout)

    def stop(self, timeout=5.0):
        """SIGTERM the group, SIGKILL after timeout. Returns the exit code."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        # Leftover group members (forked workers) get the same treatment.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.wait()

    def log_tail(self, n=8):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
            return "\n".join(lines[-n:])
        except (OSError, TypeError):
            return ""


# ---- CPU accounting ---------------------------------------------------------

def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(text):
    """(comm, fields after the comm) of a /proc stat line; comm may hold ')'."""
    lpar, rpar = text.index("("), text.rindex(")")
    return text[lpar + 1:rpar], text[rpar + 2:].split()


def process_tree(root):
    """root and all its descendants (one scan of /proc)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        text = _read("/proc/%s/stat" % d)
        if text:
            _, f = _stat_fields(text)
            children.setdefault(int(f[1]), []).append(int(d))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def thread_times(root):
    """{(pid, tid): (comm, sched_ns or None, tick_ns, cpus_allowed)} for the tree."""
    out = {}
    for pid in process_tree(root):
        try:
            tids = os.listdir("/proc/%d/task" % pid)
        except OSError:
            continue
        for tid in tids:
            base = "/proc/%d/task/%s/" % (pid, tid)
            stat = _read(base + "stat")
            if not stat:
                continue
            comm, f = _stat_fields(stat)
            ticks = int(f[11]) + int(f[12])  # utime + stime
            sched = _read(base + "schedstat")
            sched_ns = int(sched.split()[0]) if sched else None
            allowed = ""
            status = _read(base + "status") or ""
            for line in status.splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    allowed = line.split(":", 1)[1].strip()
            out[(pid, int(tid))] = (comm, sched_ns, ticks * 1e9 / CLK_TCK, allowed)
    return out


def cpu_busy_jiffies():
    """{cpu index: (busy, total)} jiffies from /proc/stat."""
    out = {}
    for line in (_read("/proc/stat") or "").splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            vals = [int(v) for v in vals[:8]]
            idle = vals[3] + vals[4]
            out[int(name[3:])] = (sum(vals) - idle, sum(vals))
    return out


def cpu_delta(before, after, classify):
    """Per-class CPU seconds between two thread_times() snapshots.

    classify(comm) -> class name. Threads born inside the window count from
    zero; threads that died inside it are lost (their time is unknown).
    Returns ({class: seconds}, {class: seconds by ticks}, {comm: seconds},
    set of Cpus_allowed_list strings seen).
    """
    by_class, by_class_ticks, by_comm, allowed = {}, {}, {}, set()
    for key, (comm, sched_ns, tick_ns, cpus) in after.items():
        comm0, sched0, tick0, _ = before.get(key, (comm, 0, 0.0, ""))
        use_sched = sched_ns is not None and sched0 is not None
        secs = (sched_ns - sched0) / 1e9 if use_sched else (tick_ns - tick0) / 1e9
        cls = classify(comm)
        by_class[cls] = by_class.get(cls, 0.0) + secs
        by_class_ticks[cls] = by_class_ticks.get(cls, 0.0) + (tick_ns - tick0) / 1e9
        by_comm[comm] = by_comm.get(comm, 0.0) + secs
        allowed.add(cpus)
    return by_class, by_class_ticks, by_comm, allowed


# ---- the load generator ----------------------------------------------------

def client_backend(choice="auto"):
    """The load generator's transport: "uring" where io_uring works (the
    cheaper client, so the server under test saturates first), else
    "kernel"; an explicit choice stands."""
    if choice != "auto":
        return choice
    from qstack.transport.binding import uring_refusal
    return "kernel" if uring_refusal() else "uring"


def load_command():
    """argv prefix that runs `qstack load` (the venv's Python when there is one)."""
    py = VENV_PY if os.access(VENV_PY, os.X_OK) else sys.executable
    return [py, "-m", "qstack", "load"]


def _flat(doc):
    """The figures the benchmarks use, from `qstack load --json` (docs/LOAD.md)."""
    lat = doc["latency_ms"]["all"]
    win, msg, conn = doc["window"], doc["messages"], doc["connections"]
    us = lambda v: None if v is None else v * 1e3   # noqa: E731
    errors = (msg["bad_replies"] + msg["unsolicited"] + conn["drops"]
              + max(0, conn["target"] - conn["max_connected"]))
    return {"mode": doc["config"]["mode"], "conns": conn["target"],
            "connected": conn["max_connected"], "size": doc["config"]["length"],
            "rate": doc["config"]["rate"] or 0.0, "seconds": win["seconds"],
            "requests": lat["count"], "rps": win["responses_per_s"],
            "incomplete": win["incomplete"], "p50_us": us(lat["p50"]),
            "p90_us": us(lat["p90"]), "p99_us": us(lat["p99"]), "p999_us": us(lat["p99.9"]),
            "max_us": us(lat["max"]), "mean_us": us(lat["mean"]), "errors": errors,
            "connect_retries": conn["retries"], "client_cpu": doc["client"]["cpu"],
            "client_busy": doc["client"]["busy"], "problems": doc["problems"],
            "status": doc["status"]}


def run_client(client, port, cpu, *, conns, size, warmup, duration, rate=0.0,
               drain=2.0, on_mark=None, extra=(), keep_doc=False, host=LOOPBACK):
    """Run `qstack load` (argv prefix `client`, see load_command) pinned to cpu:
    closed loop, or open loop at `rate` req/s.  on_mark("start"|"end") is
    called as the measured window opens and closes.  `extra` flags come
    last, so they override the defaults here (e.g. "-r", "0.05").

    Returns a flat dict of the figures (see _flat), or a dict with "error";
    with keep_doc, the whole `qstack load --json` document is in "doc"
    (per-priority latency, histograms).
    """
    argv = pin_prefix(cpu) + list(client) + [
        "--dest", "%s:%d" % (host, port), "-c", str(conns), "-l", str(size),
        "-s", "0", "-w", "0.5", "--connect-inflight", "64", "-r", "0",
        "--warmup", str(warmup), "-d", str(duration), "--drain", str(drain),
        "--spin", "0.002", "--log-duration", "0", "--marks", "--quiet", "--json", "-"]
    argv += ["--rate", "%.1f" % rate] if rate > 0 else ["--closed"]
    argv += [] if host == LOOPBACK else ["--allow-remote"]
    argv += list(extra)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    # Bounded: start-up + warm-up + window + drain + slack.
    limit = 30 + warmup + duration + drain + 15
    watchdog = threading.Timer(limit, proc.kill)
    watchdog.start()
    body = []
    try:
        for line in proc.stdout:
            if line.startswith("#"):
                if on_mark:
                    on_mark(line[1:].strip())
            else:
                body.append(line)
        err = proc.stderr.read()
        proc.wait()
    finally:
        watchdog.cancel()
    try:
        doc = json.loads("".join(body))
        result = _flat(doc)
    except (ValueError, KeyError) as e:
        why = err.strip()[-300:] or "%s %s in %r" % (type(e).__name__, e, "".join(body)[-300:])
        return {"error": "qstack load exit %s: %s" % (proc.returncode, why)}
    if keep_doc:
        result["doc"] = doc
    if err.strip():
        result["stderr"] = err.strip()[-300:]
    return result


# ---- statistics -------------------------------------------------------------

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread_pct(values):
    """Half the min-max range as a percentage of the median: a noise gauge."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    m = statistics.median(values)
    return 50.0 * (max(values) - min(values)) / m if m else None
