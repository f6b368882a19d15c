"""Run the engines: one per process, merged into one report.

Processes.  ``--smp P`` forks P worker processes; each builds its own native
engine for its share of the connections (plan_processes) and drives it in a
loop of blocking ``Engine.run(deadline)`` calls.  With P = 1 the worker runs
in this process.  Every process shares one timeline (EngineTimes, in
CLOCK_MONOTONIC ns, which all processes of the machine read alike), so bursts
line up across processes and every progress tick covers the same second.

Messages.  A worker reports through ``emit(msg)``: in-process, straight into
the :class:`Aggregator`; from a child, as a length-prefixed pickle on a pipe
that the parent reads with a selector.  Messages are tuples:

    ("tick", proc, n, stats)               cumulative counters at t_start + n s
    ("log", proc, n, stats, [high, low])   interval histograms, every --log-duration
    ("mark", proc, "start" | "end")        the measured window opened / closed
    ("final", proc, stats, [high, low], cpu_s, window_s)
                                           window histograms, CPU and length of the window
    ("error", proc, text)                  the engine could not start

Signals.  SIGINT/SIGTERM end the window early: every engine stops sending,
drains briefly and reports, so an interrupted run still prints what it
measured (exit 130).  A second one kills the children and exits at once.
A child that dies without its final message is reported by exit status.
"""

from __future__ import annotations

import os
import pickle
import resource
import selectors
import signal
import struct
import sys
import time

from qstack.errors import ConfigError
from qstack.loadgen.engine import NS, Engine, EngineTimes, now_ns
from qstack.loadgen.hist import Histogram
from qstack.loadgen.options import LoadOptions, plan_processes

__all__ = ["run", "Aggregator"]

TICK_NS = NS
POLL_NS = NS // 5          # Python looks at signals at least this often
STOP_DRAIN_S = 1.0         # drain after an interrupt
_LEN = struct.Struct("!I")


class _Stop:
    requested = False
    hard = False


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def worker(o: LoadOptions, times: EngineTimes, proc: int, first: int, count: int, emit,
           stop: _Stop) -> None:
    """Drive one engine from start to final report."""
    try:
        eng = Engine(o, times, first, count, link=proc)   # memif: process k on link k
    except OSError as e:
        emit(("error", proc, f"could not start the engine: {e.strerror or e}"))
        return
    try:
        next_tick = times.start + TICK_NS
        tick_no = 1
        log_ns = int(o.log_duration * NS)
        next_log = times.meas + log_ns if log_ns else None
        log_no = 1
        marks = [("start", times.meas), ("end", times.end)]
        cpu = {}
        stopped = False
        window_end = times.end
        while True:
            if stop.requested and not stopped:
                eng.stop(min(o.drain, STOP_DRAIN_S))
                stopped = True
                window_end = max(times.meas, min(times.end, now_ns()))
            now = now_ns()
            until = min(next_tick, now + POLL_NS)
            if next_log is not None:
                until = min(until, next_log)
            if marks:
                until = min(until, marks[0][1])
            done = eng.run(until)
            now = now_ns()
            while marks and (now >= marks[0][1] or done or stopped):
                name, _ = marks.pop(0)
                cpu[name] = _cpu_s()
                emit(("mark", proc, name))
                if not (done or stopped):
                    break
            if now >= next_tick:
                emit(("tick", proc, tick_no, eng.stats()))
                tick_no += 1
                next_tick += TICK_NS
                if next_tick <= now:   # we were stalled: skip the missed ticks
                    skip = (now - next_tick) // TICK_NS + 1
                    next_tick += skip * TICK_NS
                    tick_no += skip
            if next_log is not None and now >= next_log:
                emit(("log", proc, log_no, eng.stats(),
                      [eng.hist(0, interval=True), eng.hist(1, interval=True)]))
                log_no += 1
                next_log += log_ns
                if next_log > times.end:
                    next_log = None
            if done:
                break
        window_cpu = cpu.get("end", _cpu_s()) - cpu.get("start", _cpu_s())
        emit(("final", proc, eng.stats(), [eng.hist(0), eng.hist(1)], window_cpu,
              (window_end - times.meas) / NS,
              [eng.hist(0, written=True), eng.hist(1, written=True)]))
    finally:
        eng.close()


# ---- the parent's side ------------------------------------------------------

class Aggregator:
    """Merges what the workers report; prints progress as it goes.

    ``printer`` gets human lines (progress, interval reports); ``marks`` gets
    "#start"/"#end" lines (for harnesses, --marks).
    """

    def __init__(self, o: LoadOptions, times: EngineTimes, nproc: int, printer, marks=None):
        self.o = o
        self.times = times
        self.nproc = nproc
        self.print = printer
        self.marks_out = marks
        self.ticks: dict[int, dict[int, dict]] = {}
        self._tick_seen: dict[int, set[int]] = {}
        self._tick_stats: dict[int, dict[int, dict]] = {}
        self.logs: dict[int, dict[int, tuple]] = {}
        self.last_stats: dict[int, dict] = {}
        self.finals: dict[int, tuple] = {}
        self.errors: list[str] = []
        self.dead: set[int] = set()
        self.intervals: list[dict] = []
        self.marked: set[str] = set()
        self._prev_tick = (0, {})
        self.started_wall = time.time()

    # ----- messages
    def on_message(self, msg) -> None:
        kind, proc = msg[0], msg[1]
        if kind == "tick":
            _, _, n, stats = msg
            self.last_stats[proc] = stats
            self.ticks.setdefault(n, {})[proc] = stats
            self._tick_seen.setdefault(proc, set()).add(n)
            self._tick_stats.setdefault(proc, {})[n] = stats
            self._flush_ticks()
        elif kind == "log":
            _, _, n, stats, hists = msg
            self.last_stats[proc] = stats
            self.logs.setdefault(n, {})[proc] = (stats, hists)
            self._flush_logs()
        elif kind == "mark":
            name = msg[2]
            if name not in self.marked and proc == 0:
                self.marked.add(name)
                if self.marks_out:
                    self.marks_out("#" + name)
        elif kind == "final":
            _, _, stats, hists, cpu, window_s, written = msg
            self.last_stats[proc] = stats
            self.finals[proc] = (stats, hists, cpu, window_s, written)
            self._flush_ticks()
            self._flush_logs()
        elif kind == "error":
            self.errors.append(msg[2])
            self.dead.add(proc)

    def process_gone(self, proc: int, how: str) -> None:
        if proc not in self.finals and proc not in self.dead:
            self.dead.add(proc)
            self.errors.append(f"load process {proc} {how} before reporting")
        self._flush_ticks()
        self._flush_logs()

    def _live(self) -> set[int]:
        return set(range(self.nproc)) - self.dead - set(self.finals)

    # ----- progress
    def _sum(self, per_proc: dict[int, dict]) -> dict[str, int]:
        out: dict[str, int] = {}
        for stats in per_proc.values():
            for k, v in stats.items():
                if k in ("max_lag_ns", "last_errno"):
                    out[k] = max(out.get(k, 0), v)
                else:
                    out[k] = out.get(k, 0) + v
        return out

    def _flush_ticks(self) -> None:
        """Print tick n once every live process has reported tick n or later,
        each process counted by its latest report at or before n (a stalled
        process may skip ticks; a finished one counts with its final stats)."""
        while self.ticks:
            n = min(self.ticks)
            latest = {p: max(t) for p, t in self._tick_seen.items() if t}
            if any(latest.get(p, 0) < n for p in self._live()):
                return
            per_proc = {}
            for p in range(self.nproc):
                upto = [t for t in self._tick_seen.get(p, ()) if t <= n]
                if p in self.finals and not any(t >= n for t in self._tick_seen.get(p, ())):
                    per_proc[p] = self.finals[p][0]
                elif upto:
                    per_proc[p] = self._tick_stats[p][max(upto)]
            self._progress(n, self._sum(per_proc))
            del self.ticks[n]
            for p in self._tick_seen:   # keep only what later ticks may need
                older = [t for t in self._tick_seen[p] if t < n]
                for t in older[:-1]:
                    self._tick_seen[p].discard(t)
                    self._tick_stats[p].pop(t, None)

    def _progress(self, n: int, s: dict) -> None:
        prev_n, prev = self._prev_tick
        dt = max(n - prev_n, 1)
        rate = (s["sent"] - prev.get("sent", 0)) / dt
        resp_rate = (s["responses"] - prev.get("responses", 0)) / dt
        self._prev_tick = (n, s)
        if self.o.quiet:
            return
        self.print(f"[{n:5d}s] connected {s['connected']:,}  retries {s['retries']:,}  "
                   f"sent {s['sent']:,}  requests {s['requests']:,}  "
                   f"responses {s['responses']:,}  rate {rate:,.0f} msg/s "
                   f"{resp_rate:,.0f} resp/s")

    def _flush_logs(self) -> None:
        from qstack.loadgen import report
        for n in sorted(self.logs):
            got = self.logs[n]
            if not self._live() <= set(got):
                break
            hists = [Histogram.merged(h[1][lvl] for h in got.values()) for lvl in (0, 1)]
            entry = {"t": n * self.o.log_duration, "seconds": self.o.log_duration,
                     "latency_ms": report.latency_table(hists)}
            self.intervals.append(entry)
            if not self.o.quiet:
                self.print(report.format_latency(
                    entry["latency_ms"],
                    f"latency over the last {self.o.log_duration:g} s of the window "
                    f"(at {entry['t']:g} s)"))
            del self.logs[n]

    # ----- result
    def result(self, interrupted: bool = False) -> dict:
        from qstack.loadgen import report
        stats = self._sum({p: f[0] for p, f in self.finals.items()}
                          | {p: s for p, s in self.last_stats.items() if p not in self.finals})
        hists = [Histogram.merged(f[1][lvl] for f in self.finals.values()) for lvl in (0, 1)]
        written = [Histogram.merged(f[4][lvl] for f in self.finals.values()) for lvl in (0, 1)]
        cpu = sum(f[2] for f in self.finals.values())
        window_s = max((f[3] for f in self.finals.values()), default=self.o.duration)
        return report.build(self.o, stats, hists, cpu, self.intervals, self.errors,
                            window_s=window_s, written=written,
                            interrupted=interrupted, complete=len(self.finals) == self.nproc)


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _send(fd: int, msg) -> None:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    data = _LEN.pack(len(data)) + data
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        view = view[n:]


class _Reader:
    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()

    def feed(self) -> list | None:
        """New complete messages, or None at EOF."""
        try:
            chunk = os.read(self.fd, 1 << 20)
        except InterruptedError:
            return []
        if not chunk:
            return None
        self.buf += chunk
        out = []
        while len(self.buf) >= 4:
            (n,) = _LEN.unpack_from(self.buf)
            if len(self.buf) < 4 + n:
                break
            out.append(pickle.loads(bytes(self.buf[4:4 + n])))
            del self.buf[:4 + n]
        return out


def run(o: LoadOptions, printer=None, marks=None, start_delay: float = 0.1) -> dict:
    """Run the load as configured; returns the report document (report.build)."""
    printer = printer or (lambda line: print(line, flush=True))
    plan = plan_processes(o)
    _raise_nofile(max(n for _, n in plan) + 64)
    t_start = now_ns() + int((start_delay if o.smp > 1 else 0.01) * NS)
    times = EngineTimes(o, t_start)
    agg = Aggregator(o, times, o.smp, printer, marks)
    stop = _Stop()
    sig_counts = {"n": 0}
    children: dict[int, int] = {}

    def on_signal(signum, frame):
        sig_counts["n"] += 1
        stop.requested = True
        if sig_counts["n"] > 1:
            stop.hard = True
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise KeyboardInterrupt
        for pid in children:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if o.smp == 1:
            worker(o, times, 0, plan[0][0], plan[0][1], agg.on_message, stop)
        else:
            _run_children(o, times, plan, agg, stop, children)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return agg.result(interrupted=stop.requested)


def _run_children(o, times, plan, agg, stop, children) -> None:
    sel = selectors.DefaultSelector()
    sys.stdout.flush()
    sys.stderr.flush()
    for proc, (first, count) in enumerate(plan):
        r, w = os.pipe()
        try:
            pid = os.fork()
        except OSError as e:
            os.close(r)
            os.close(w)
            for other in children:
                os.kill(other, signal.SIGKILL)
                os.waitpid(other, 0)
            raise ConfigError(f"cannot start load process {proc} of {len(plan)}: "
                              f"{e.strerror}") from None
        if pid == 0:   # child
            code = 0
            try:
                os.close(r)
                child_stop = _Stop()

                def on_child_signal(signum, frame):
                    child_stop.requested = True

                signal.signal(signal.SIGINT, on_child_signal)
                signal.signal(signal.SIGTERM, on_child_signal)
                worker(o, times, proc, first, count, lambda m: _send(w, m), child_stop)
            except BaseException as e:   # never let a child run the parent's code
                try:
                    _send(w, ("error", proc, f"load process {proc} failed: "
                                             f"{type(e).__name__}: {e}"))
                except OSError:
                    pass
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        children[pid] = proc
        sel.register(r, selectors.EVENT_READ, (_Reader(r), pid, proc))
    open_fds = len(plan)
    while open_fds:
        for key, _ in sel.select(timeout=0.5):
            reader, pid, proc = key.data
            msgs = reader.feed()
            if msgs is None:
                sel.unregister(key.fd)
                os.close(key.fd)
                open_fds -= 1
                _, status = os.waitpid(pid, 0)
                children.pop(pid, None)
                if os.WIFSIGNALED(status):
                    how = f"was killed by signal {os.WTERMSIG(status)}"
                else:
                    how = f"exited with status {os.WEXITSTATUS(status)}"
                agg.process_gone(proc, how)
                continue
            for m in msgs:
                agg.on_message(m)
    sel.close()
