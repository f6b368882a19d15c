"""The ``--stats`` lines: per-core snapshots in, one readable line per core out.

This is QStack's stat_print.  Each core's hub sends a snapshot of cumulative
counters once per interval; StatsView keeps the previous snapshot per core and
prints what happened in between (rates, latency percentiles from the
histogram delta) plus current gauges (connections, queue depth, buffers).

Snapshot (a plain dict, so it can travel as one JSON line over a pipe)::

    {"core": 0, "t": <monotonic s>, "conns": open, "accepted": cumulative,
     "bufs_in_use": n, "bufs_total": n, "cpu_stack": s, "cpu_hub": s,
     "errors": handler errors, "protocol_errors", "accept_errors",
     "hub_blocks": cumulative, "paused_conns": current,
     "levels": [{"requests", "bytes_in", "bytes_out", "replies": cumulative,
                 "queued": current depth, "lat": [328 cumulative counts]}],
     "counters": {name: [cumulative count per level]}}   # only if the app counted

Errors are shown as totals since the core started, always (a zero is news
too): ``paused 0  protocol_errors 2 accept_errors 0 handler_errors 5
hub_blocks 1`` -- connections not read right now because their level's
queue is full, frames the native layer refused (each reset its connection),
failed accept() calls, handlers that raised or returned a bad reply, and
times a handler kept the hub from running for longer than
server.block_warning.

App counters (qstack.count) are shown as totals since the core started, and
only those with a non-zero level: ``redis_errors L0 3 L1 12``.

Latency histogram: 8 linear sub-buckets per power of two of nanoseconds,
the native core's own buckets (qs_lat_bucket, qs_lat_bucket_low/_width in
qstack.h; the layout is defined once, in qstack/native/common/hist.h), read
through cffi.  Bucket v < 16 holds exactly v ns; above, a bucket holds the
values whose top four bits agree, so a reported percentile is at most 12.5%
above the true value.

Printed (``stats_lines``), each text line ends with the local time it was
printed, ``  at 2025-01-01T12:00:01``; the timestamp goes last so that
tools matching ``core 0`` at the start of a line keep working.  With
``server.stats_format: json`` each core's snapshot is printed as it is, one
JSON object per line, with ``"time"`` (Unix seconds) added.

A counter that went backwards means the core restarted (the supervisor
restarts crashed children): its new snapshot becomes the baseline and that
interval shows '-' rather than negative rates.
"""

from __future__ import annotations

import datetime
import json
import math
import time

from qstack.transport import lib as _lib

QS_LAT_BUCKETS = _lib.QS_LAT_BUCKETS
_MAX_NS = (1 << 64) - 1


def bucket_of(ns: int) -> int:
    """Histogram bucket holding a latency of ``ns`` nanoseconds."""
    return _lib.qs_lat_bucket(min(max(0, int(ns)), _MAX_NS))


def bucket_upper_ns(i: int) -> int:
    """Largest latency (ns) bucket ``i`` holds: what a percentile reports
    (for the last bucket, the end of its regular range)."""
    return _lib.qs_lat_bucket_low(i) + _lib.qs_lat_bucket_width(i) - 1


def percentile(hist: list[int], q: float) -> int | None:
    """Upper bound (ns) of the bucket holding quantile ``q`` (0 < q <= 1).

    None when the histogram is empty.
    """
    total = sum(hist)
    if total <= 0:
        return None
    # ceil(q * total), forgiving float noise like 0.99 * 100 = 99.00000000000001
    rank = max(1, math.ceil(q * total - 1e-9))
    seen = 0
    for i, count in enumerate(hist):
        seen += count
        if seen >= rank:
            return bucket_upper_ns(i)
    return bucket_upper_ns(len(hist) - 1)


# --- formatting -------------------------------------------------------------

def fmt_ns(ns: int | None) -> str:
    if ns is None:
        return "-"
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= scale:
            v = ns / scale
            return f"{v:.1f}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return f"{ns}ns"


def fmt_count(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}%"


# --- per-interval deltas ----------------------------------------------------

class _Interval:
    """What one core (or the sum of cores) did during one interval."""

    def __init__(self, nlevels: int):
        self.conns = 0
        self.bufs_in_use = 0
        self.bufs_total = 0
        self.cpu_stack: float | None = None   # percent of one CPU
        self.cpu_hub: float | None = None
        self.req_rate: list[float | None] = [None] * nlevels
        self.byte_rate: list[float | None] = [None] * nlevels
        self.queued = [0] * nlevels
        self.lat = [[0] * QS_LAT_BUCKETS for _ in range(nlevels)]
        self.counters: dict[str, list[int]] = {}
        self.net: dict[str, int] | None = None   # the user-space stack's gauges
        self.faults = dict.fromkeys(FAULTS, 0)   # errors (totals) and paused conns

    def add(self, other: "_Interval") -> None:
        """Sum another core into this one (rates add, histograms merge)."""
        def plus(a, b):
            return b if a is None else a if b is None else a + b
        self.conns += other.conns
        self.bufs_in_use += other.bufs_in_use
        self.bufs_total += other.bufs_total
        self.cpu_stack = plus(self.cpu_stack, other.cpu_stack)
        self.cpu_hub = plus(self.cpu_hub, other.cpu_hub)
        for name in FAULTS:
            self.faults[name] += other.faults[name]
        for lv in range(min(len(self.queued), len(other.queued))):
            self.req_rate[lv] = plus(self.req_rate[lv], other.req_rate[lv])
            self.byte_rate[lv] = plus(self.byte_rate[lv], other.byte_rate[lv])
            self.queued[lv] += other.queued[lv]
            self.lat[lv] = [a + b for a, b in zip(self.lat[lv], other.lat[lv])]
        if other.net is not None:
            self.net = {k: (self.net or {}).get(k, 0) + v for k, v in other.net.items()}
        for name, values in other.counters.items():
            mine = self.counters.setdefault(name, [])
            mine.extend([0] * (len(values) - len(mine)))
            for lv, v in enumerate(values):
                mine[lv] += v

    def line(self, label: str) -> str:
        parts = []
        for lv in range(len(self.queued)):
            mbs = self.byte_rate[lv]
            parts.append(
                f"L{lv} {fmt_count(self.req_rate[lv])} req/s "
                f"{'-' if mbs is None else f'{mbs / 1e6:.1f}'} MB/s "
                f"q {self.queued[lv]} "
                f"p50 {fmt_ns(percentile(self.lat[lv], 0.5))} "
                f"p99 {fmt_ns(percentile(self.lat[lv], 0.99))}")
        return (f"{label:<6}  conns {self.conns}  " + " | ".join(parts) +
                f"  bufs {self.bufs_in_use}/{self.bufs_total}"
                f"  cpu stack {_pct(self.cpu_stack)} hub {_pct(self.cpu_hub)}" +
                format_faults(self.faults) + format_net(self.net) + format_counters(self.counters, len(self.queued)))


# snapshot key -> the name a stats line shows
FAULTS = {"paused_conns": "paused", "protocol_errors": "protocol_errors",
          "accept_errors": "accept_errors", "errors": "handler_errors",
          "hub_blocks": "hub_blocks", "timeouts_message": "msg_timeouts",
          "timeouts_idle": "idle_timeouts", "timeouts_write": "write_timeouts",
          "quota_closes": "quota_closes"}


def format_faults(faults: dict) -> str:
    """``"  paused 0  protocol_errors 0 accept_errors 0 handler_errors 0 hub_blocks 0"``."""
    shown = [f"{FAULTS[k]} {faults.get(k, 0)}" for k in FAULTS]
    return "  " + shown[0] + "  " + " ".join(shown[1:])


def format_net(net: dict | None) -> str:
    """The user-space stack's part of a stats line (empty on the kernel backend)."""
    if not net:
        return ""
    return (f"  ustack tcbs {net['tcbs']} pkt bufs {net['bufs_in_use']}/{net['bufs_total']}"
            f" drops {net['drops']} rexmit {net['rexmit']} tlp {net['tlp']}")


def format_counters(counters: dict, nlevels: int) -> str:
    """``"  name L0 n L1 n"`` for each counter with a non-zero level, else ""."""
    out = ""
    for name in sorted(counters):
        values = list(counters[name])
        if any(values):
            values += [0] * (nlevels - len(values))
            out += f"  {name} " + " ".join(f"L{lv} {v}" for lv, v in enumerate(values))
    return out


def _went_back(prev: dict, cur: dict) -> bool:
    if cur["t"] <= prev["t"] or cur["accepted"] < prev["accepted"]:
        return True
    if len(cur["levels"]) != len(prev["levels"]):
        return True
    return any(c["requests"] < p["requests"]
               for p, c in zip(prev["levels"], cur["levels"]))


def _interval(prev: dict | None, cur: dict) -> _Interval:
    levels = cur["levels"]
    iv = _Interval(len(levels))
    iv.conns = cur["conns"]
    iv.bufs_in_use = cur["bufs_in_use"]
    iv.bufs_total = cur["bufs_total"]
    iv.queued = [lv["queued"] for lv in levels]
    iv.counters = {name: list(v) for name, v in cur.get("counters", {}).items()}
    iv.net = cur.get("net")
    iv.faults = {name: cur.get(name, 0) for name in FAULTS}
    if prev is None or _went_back(prev, cur):
        return iv  # no baseline: gauges only
    dt = cur["t"] - prev["t"]
    iv.cpu_stack = 100.0 * (cur["cpu_stack"] - prev["cpu_stack"]) / dt
    iv.cpu_hub = 100.0 * (cur["cpu_hub"] - prev["cpu_hub"]) / dt
    for i, (p, c) in enumerate(zip(prev["levels"], levels)):
        iv.req_rate[i] = (c["requests"] - p["requests"]) / dt
        # MB/s counts both directions: what crossed the socket at this level.
        iv.byte_rate[i] = ((c["bytes_in"] - p["bytes_in"]) +
                           (c["bytes_out"] - p["bytes_out"])) / dt
        iv.lat[i] = [b - a for a, b in zip(p["lat"], c["lat"])]
    return iv


class StatsView:
    """Turns successive snapshots into lines, remembering the last per core."""

    def __init__(self) -> None:
        self._prev: dict[int, dict] = {}

    def update(self, snapshots: list[dict]) -> list[str]:
        """One line per core in ``snapshots``, then a total line if several."""
        lines = []
        total: _Interval | None = None
        for snap in sorted(snapshots, key=lambda s: s["core"]):
            iv = _interval(self._prev.get(snap["core"]), snap)
            self._prev[snap["core"]] = snap
            lines.append(iv.line(f"core {snap['core']}"))
            if total is None:
                total = _Interval(len(iv.queued))
            total.add(iv)
        if len(lines) > 1 and total is not None:
            lines.append(total.line("total"))
        return lines

    def forget(self, core: int) -> None:
        """Drop a core's baseline (e.g. its process was restarted)."""
        self._prev.pop(core, None)


def stats_lines(view: StatsView, snapshots: list[dict], fmt: str = "text",
                now: float | None = None) -> list[str]:
    """What ``--stats`` prints for one interval, in ``server.stats_format``."""
    now = time.time() if now is None else now
    if fmt == "json":
        return [json.dumps({"time": round(now, 3), **snap}, separators=(",", ":"))
                for snap in sorted(snapshots, key=lambda s: s["core"])]
    stamp = datetime.datetime.fromtimestamp(now).isoformat(timespec="seconds")
    return [f"{line}  at {stamp}" for line in view.update(snapshots)]
