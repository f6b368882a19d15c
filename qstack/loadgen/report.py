"""Reports: the text summary, HCMonitor's cdf.txt, the JSON document, the plot.

All of them come from one document built by :func:`build` (the JSON that
``--json`` writes), so the figures agree everywhere.  Latencies are in
milliseconds, quantiles by nearest rank over HDR buckets (see hist.py).

cdf.txt (HCMonitor's layout)::

    connections:1000,avg_delay:0.412345
    0.10:    0.3210;            0.3011;                    0.3390
    ...
    0.99:    0.9120;            0.8001;                    0.9900
    0.9990:   1.2000;           1.1000;                   1.3000
    0.9999:   1.5000;           1.4000;                   1.6000
    1.0000:   1.7000;           1.5000;                   1.7000

The header holds the connections established at the end of the window and
the mean latency over all replies (ms); then one line per quantile with
total; high; low in ms.  A priority without replies shows ``nan`` (HCMonitor
drops the column, which a parser cannot tell apart).  Split a line on ':'
and ';' and read floats.
"""

from __future__ import annotations

import json
import math
import os
import sys

from qstack.errors import ConfigError
from qstack.loadgen.hist import Histogram

__all__ = ["build", "CDF_QUANTILES", "cdf_text", "parse_cdf", "latency_table",
           "format_latency", "format_report", "write_outputs", "plot_cdf"]

CDF_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999, 1.0)
TABLE_QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))
LEVELS = ("all", "high", "low")
SCHEMA = 1


def _ms(ns):
    return None if ns is None else ns / 1e6


def _hists(hists: list[Histogram]) -> dict[str, Histogram]:
    return {"all": Histogram.merged(hists), "high": hists[0], "low": hists[1]}


def latency_table(hists: list[Histogram]) -> dict[str, dict]:
    """{all|high|low: {count, mean, min, p50, p90, p99, p99.9, max}} in ms."""
    out = {}
    for name, h in _hists(hists).items():
        qs = h.quantiles([q for _, q in TABLE_QUANTILES])
        row = {"count": h.count, "mean": _ms(h.mean()), "min": _ms(h.min if h.count else None)}
        row.update({label: _ms(v) for (label, _), v in zip(TABLE_QUANTILES, qs)})
        row["max"] = _ms(h.max if h.count else None)
        out[name] = row
    return out


def _fmt_ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 100 else f"{v:,.1f}"


def format_latency(table: dict, title: str) -> str:
    lines = [f"{title}:",
             f"  {'(ms)':<6} {'count':>11} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9} "
             f"{'p99.9':>9} {'max':>9}"]
    for name in LEVELS:
        r = table[name]
        lines.append(f"  {name:<6} {r['count']:>11,} {_fmt_ms(r['mean']):>9} "
                     f"{_fmt_ms(r['p50']):>9} {_fmt_ms(r['p90']):>9} {_fmt_ms(r['p99']):>9} "
                     f"{_fmt_ms(r['p99.9']):>9} {_fmt_ms(r['max']):>9}")
    return "\n".join(lines)


# ---- the document ------------------------------------------------------------

def _problems(o, s: dict, incomplete: int) -> list[str]:
    """Every limit or fault the run hit, in plain words."""
    out = []
    if s["err_nofile"]:
        out.append(f"{s['err_nofile']:,} connection attempts failed for lack of file "
                   f"descriptors (EMFILE/ENFILE): each process may hold only so many open "
                   f"files (ulimit -n); use more --smp processes")
    if s["err_noport"]:
        out.append(f"{s['err_noport']:,} connection attempts found no free source port "
                   f"(EADDRNOTAVAIL): one source address has about 28,000 ports per "
                   f"destination; use --ips K to spread connections over 127.0.0.0/8")
    if s["err_refused"]:
        out.append(f"{s['err_refused']:,} connection attempts were refused by {o.dest} "
                   f"(nothing listening, or its accept queue was full); they were retried "
                   f"after {o.retry_delay:g} s")
    if s["err_timeout"]:
        out.append(f"{s['err_timeout']:,} connection attempts got no answer within "
                   f"{o.connect_timeout:g} s (SYNs dropped: a full accept queue or SYN "
                   f"backlog?); spread them with a longer -s")
    if s["err_reset"]:
        out.append(f"{s['err_reset']:,} connections or attempts were reset by the peer")
    if s["err_nomem"]:
        out.append(f"{s['err_nomem']:,} connection attempts failed: the kernel ran out of "
                   f"socket memory (ENOBUFS/ENOMEM)")
    if s["err_other"]:
        out.append(f"{s['err_other']:,} connection errors of another kind (the last: "
                   f"{os.strerror(s['last_errno'])})")
    missing = o.connections - s.get("connected", 0)
    if missing > 0 and s.get("established", 0) > 0:
        why = []
        if s.get("unstarted"):
            why.append(f"{s['unstarted']:,} never got their first attempt before the window "
                       f"ended (at most --connect-inflight {o.connect_inflight} connects are "
                       f"in flight at a time; a server that accepts slowly"
                       + ("" if o.ips else ", or connect() searching for free ports (see "
                                            "--ips)") + " holds them back: a longer -s/-w helps)")
        if s.get("connecting"):
            why.append(f"{s['connecting']:,} were still connecting")
        out.append(f"{missing:,} of {o.connections:,} connections were not established at the "
                   f"end" + (": " + "; ".join(why) if why else ""))
    if s["drops"]:
        out.append(f"{s['drops']:,} established connections were lost (closed, reset or a "
                   f"bad reply) and reopened after {o.retry_delay:g} s")
    if s["bad_replies"]:
        out.append(f"{s['bad_replies']:,} replies failed verification (corrupted, misrouted, "
                   f"or the server does not echo --protocol {o.protocol}); their connections "
                   f"were reopened")
    if s["unsolicited"]:
        out.append(f"{s['unsolicited']:,} replies arrived that no request was waiting for "
                   f"(does the server answer heartbeats, or is --reply-len wrong?)")
    if s["missed"]:
        out.append(f"{s['missed']:,} scheduled messages were skipped because their "
                   f"connection was down at the time")
    if s["lost"]:
        out.append(f"{s['lost']:,} requests were lost with their connection")
    if s["deferred"]:
        out.append(f"{s['deferred']:,} messages waited for a free slot (--window "
                   f"{o.window} outstanding per connection): replies were slower than the "
                   f"schedule; their latency still counts from the intended send time")
    if s["late_sends"]:
        out.append(f"{s['late_sends']:,} messages left more than 1 ms after their intended "
                   f"time (at worst {s['max_lag_ns'] / 1e6:,.1f} ms): the client fell behind "
                   f"(CPU?), and that lag is part of their latency")
    if incomplete:
        out.append(f"{incomplete:,} requests of the window got no reply within --drain "
                   f"{o.drain:g} s")
    if s.get("timed_out"):
        out.append(f"{s['timed_out']:,} requests were given up after --reply-timeout "
                   f"{o.reply_timeout:g} s without a reply (later replies were not charged "
                   f"their wait)")
    return out


def unanswered(s: dict) -> tuple[int, int]:
    """(requests that never got a reply, requests): over the whole run.

    Every request that expected a reply and did not get one by the end of
    the drain counts: still outstanding, lost with its connection, or given
    up after --reply-timeout.
    """
    requests = s.get("requests", 0)
    return max(0, requests - s.get("responses", 0)), requests


def _lost_reason(o, s: dict) -> str | None:
    """Why the run fails for unanswered requests, or None if it does not."""
    n, requests = unanswered(s)
    if not n or n <= o.max_lost * requests:
        return None
    parts = []
    if s.get("outstanding"):
        parts.append(f"{s['outstanding']:,} still waiting after --drain {o.drain:g} s")
    if s.get("lost"):
        parts.append(f"{s['lost']:,} lost with their connection")
    if s.get("timed_out"):
        parts.append(f"{s['timed_out']:,} given up after --reply-timeout {o.reply_timeout:g} s")
    if not s.get("responses"):
        parts.append("the server never replied")
    return (f"{n:,} of {requests:,} requests ({100 * n / requests:.2f}%) got no reply, more "
            f"than --max-lost {o.max_lost:g} allows" + (": " + "; ".join(parts) if parts else ""))


def build(o, stats: dict, hists: list[Histogram], cpu_s: float, intervals: list,
          errors: list[str], interrupted: bool = False, complete: bool = True,
          window_s: float | None = None, written: list[Histogram] | None = None) -> dict:
    """The report document (what --json writes).  window_s is the measured
    window's actual length (shorter than -d when interrupted).  written: the
    same requests timed from when they were written instead of when they were
    due (the server's and the link's share, as HCMonitor sees it on the wire)."""
    s = stats
    window = window_s if window_s else o.duration
    incomplete = max(0, s.get("w_requests", 0) - s.get("w_responses", 0))
    offered = o.rate if o.mode == "rate" else (
        o.connections / o.epoch if o.mode == "epoch" else None)
    hs = _hists(hists)
    cdf = {"quantiles": list(CDF_QUANTILES)}
    for name, h in hs.items():
        cdf[name] = [_ms(v) for v in h.quantiles(CDF_QUANTILES)]
    busy = (cpu_s - s.get("idle_ns", 0) / 1e9) / window if window else None
    problems = _problems(o, s, incomplete) if s else []
    lost_reason = _lost_reason(o, s) if s and complete else None
    if lost_reason:
        errors = list(errors) + [lost_reason]
    if s.get("script_errors"):
        errors = list(errors) + [f"the script's request() or response() failed "
                                 f"{s['script_errors']:,} times (the first reason is "
                                 f"printed above: 'qstack load: script error: ...')"]
    ok = (complete and not errors and s.get("established", 0) > 0 and
          not s.get("bad_replies") and not s.get("unsolicited"))
    return {
        "schema": SCHEMA,
        "tool": "qstack load",
        "status": "interrupted" if interrupted else ("ok" if ok else "failed"),
        "script_errors": s.get("script_errors", 0),
        "config": {
            "dest": o.dest, "protocol": o.protocol, "script": o.script, "mode": o.mode,
            "connections": o.connections, "setup_s": o.setup, "wait_s": o.wait,
            "epoch_s": o.epoch, "burst": o.burst, "length": o.length,
            "reply_len": o.reply_len if o.protocol != "echo" else o.length,
            "ratio": o.ratio, "grain": o.grain, "seed": o.seed, "duration_s": o.duration,
            "warmup_s": o.warmup, "drain_s": o.drain, "rate": o.rate or None,
            "window": o.window, "smp": o.smp, "ips": o.ips,
            "retry_delay_s": o.retry_delay, "connect_timeout_s": o.connect_timeout,
            "reply_timeout_s": o.reply_timeout, "max_lost": o.max_lost,
            "log_duration_s": o.log_duration, "backend": o.backend,
            **({"ip": o.ip, "driver": o.driver, "tap": o.tap, "eal": o.eal, "memif": o.memif,
               "loss": o.loss} if o.backend == "ustack" else {}),
        },
        "connections": {
            "target": o.connections, "connected": s.get("connected", 0),
            "max_connected": s.get("max_connected", 0), "attempts": s.get("attempts", 0),
            "established": s.get("established", 0), "retries": s.get("retries", 0),
            "drops": s.get("drops", 0),
            "errors": {k[4:]: s.get(k, 0) for k in
                       ("err_refused", "err_timeout", "err_reset", "err_nofile",
                        "err_noport", "err_nomem", "err_other")},
        },
        "messages": {
            "sent": s.get("sent", 0), "sent_high": s.get("sent_high", 0),
            "sent_low": s.get("sent", 0) - s.get("sent_high", 0),
            "requests": s.get("requests", 0), "requests_high": s.get("requests_high", 0),
            "responses": s.get("responses", 0), "responses_high": s.get("responses_high", 0),
            "missed": s.get("missed", 0), "deferred": s.get("deferred", 0),
            "lost": s.get("lost", 0), "bad_replies": s.get("bad_replies", 0),
            "timed_out": s.get("timed_out", 0),
            "unanswered": unanswered(s)[0] if s else 0,
            "matched_by_counter": s.get("by_seq", 0),
            "unsolicited": s.get("unsolicited", 0), "late_sends": s.get("late_sends", 0),
            "max_lag_ms": s.get("max_lag_ns", 0) / 1e6,
            "tx_bytes": s.get("tx_bytes", 0), "rx_bytes": s.get("rx_bytes", 0),
        },
        "window": {
            "seconds": window, "sent": s.get("w_sent", 0),
            "requests": s.get("w_requests", 0), "requests_high": s.get("w_requests_high", 0),
            "responses": s.get("w_responses", 0), "incomplete": incomplete,
            "responses_per_s": s.get("w_done", 0) / window,
            "sent_per_s": s.get("w_sent", 0) / window,
            "offered_per_s": offered,
        },
        "latency_ms": {name: row for name, row in latency_table(hists).items()},
        "latency_from_write_ms": latency_table(written) if written else None,
        "cdf_ms": cdf,
        "intervals": intervals,
        "client": {"cpu": cpu_s / window if window else None,
                   "busy": busy, "processes": o.smp},
        "histograms": {"unit": "ns", "layout": "hdr-log-linear sub_bits=10 max_bits=40",
                       "high": hists[0].to_json(), "low": hists[1].to_json()},
        "problems": problems,
        "errors": errors,
    }


def format_report(doc: dict) -> str:
    c, m, w = doc["connections"], doc["messages"], doc["window"]
    cfg = doc["config"]
    lines = [f"--- qstack load: {doc['status']} ---",
             f"connections: {c['connected']:,} of {c['target']:,} connected at the end "
             f"(max {c['max_connected']:,}); {c['attempts']:,} attempts, "
             f"{c['retries']:,} retries, {c['drops']:,} drops",
             f"messages: sent {m['sent']:,} (high {m['sent_high']:,}, low {m['sent_low']:,}), "
             f"requests {m['requests']:,}, responses {m['responses']:,}",
             f"window {w['seconds']:g} s: sent {w['sent']:,}, requests {w['requests']:,} "
             f"(high {w['requests_high']:,}), responses {w['responses']:,}, "
             f"incomplete {w['incomplete']:,}; {w['responses_per_s']:,.1f} responses/s"
             + (f", offered {w['offered_per_s']:,.1f} msg/s" if w["offered_per_s"] else ""),
             format_latency(doc["latency_ms"], "latency of the window's requests (from "
                            "intended send time)")]
    if doc.get("latency_from_write_ms") and cfg["mode"] != "closed":
        lines.append(format_latency(doc["latency_from_write_ms"], "the same from when each "
                                    "was written (the server and the link, without the "
                                    "client's lateness)"))
    cl = doc["client"]
    if cl["cpu"] is not None:
        lines.append(f"client CPU: {100 * cl['cpu']:.1f}% of one core over the window "
                     f"({cfg['smp']} process{'es' if cfg['smp'] > 1 else ''})")
    for p in doc["problems"]:
        lines.append("note: " + p)
    for e in doc["errors"]:
        lines.append("error: " + e)
    return "\n".join(lines)


# ---- cdf.txt -----------------------------------------------------------------

def _cell(v, width: int) -> str:
    return f"{v:{width}.4f}" if v is not None else f"{'nan':>{width}}"


def cdf_text(connections: int, hists: list[Histogram]) -> str:
    """HCMonitor's cdf.txt for the high (level 0) and low (level 1) histograms."""
    hs = _hists(hists)
    mean = hs["all"].mean()
    cols = {name: h.quantiles(CDF_QUANTILES) for name, h in hs.items()}
    lines = [f"connections:{connections},avg_delay:{(mean or 0.0) / 1e6:f}"]
    for i, q in enumerate(CDF_QUANTILES):
        t, hi, lo = (_ms(cols[n][i]) for n in LEVELS)
        if q < 0.999:             # 0.10 .. 0.99: HCMonitor's "%.2f: %9.4f; %17.4f; %25.4f"
            lines.append(f"{q:.2f}: {_cell(t, 9)}; {_cell(hi, 17)}; {_cell(lo, 25)}")
        else:                     # 0.9990, 0.9999, 1.0000: "%.4f: %8.4f; %16.4f; %24.4f"
            lines.append(f"{q:.4f}: {_cell(t, 8)}; {_cell(hi, 16)}; {_cell(lo, 24)}")
    return "\n".join(lines) + "\n"


def parse_cdf(text: str) -> dict:
    """Read cdf.txt back: {connections, avg_delay, rows: [(q, total, high, low)]}."""
    lines = text.strip().splitlines()
    head = dict(kv.split(":", 1) for kv in lines[0].split(","))
    rows = []
    for line in lines[1:]:
        q, rest = line.split(":", 1)
        vals = [float(x) for x in rest.split(";")]
        rows.append((float(q), *vals))
    return {"connections": int(head["connections"]), "avg_delay": float(head["avg_delay"]),
            "rows": rows}


# ---- files -------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib, which is not installed: "
                          "pip install 'qstack[plot]' (or pip install matplotlib)") from None
    return plt


SPECTRUM_TICKS = (0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999)


def spectrum_points(h: Histogram) -> list[tuple[float, int]]:
    """The percentile spectrum as steps (1 / (1 - q), value): q is the share
    of values below the bucket, so a bucket's value holds from its x to the
    next step's.  x = 2 is the median, 100 is p99, 1,000 is p99.9."""
    out, below = [], 0.0
    for value, frac in h.cdf_points():
        out.append((1.0 / (1.0 - below), value))
        below = frac
    return out


def draw_latency(series, title: str, path: str, xlabel: str = "from intended send time") -> None:
    """Two panels as a PNG: the latency CDF (log-scaled time) and the
    percentile spectrum (HdrHistogram's plot: x is 1/(1-q) on a log scale,
    so p99, p99.9 and p99.99 get equal room).  ``series`` is a list of
    (label, Histogram, color, linestyle); empty histograms are skipped."""
    plt = _pyplot()
    fig, (cdf, spec) = plt.subplots(1, 2, figsize=(12, 4.5))
    top = 1.0
    drawn = 0
    for label, h, color, ls in series:
        pts = h.cdf_points()
        if not pts:
            continue
        ms = [max(v, 1) / 1e6 for v, _ in pts]
        frac = [f for _, f in pts]
        cdf.step(ms, frac, where="post", color=color, linestyle=ls,
                 label=f"{label} ({h.count:,})")
        xs = [x for x, _ in spectrum_points(h)]
        # the largest value holds up to the rank of the count: x = N
        xs, ys = xs + [max(float(h.count), xs[-1])], ms + [ms[-1]]
        spec.step(xs, ys, where="post", color=color, linestyle=ls, label=label)
        top = max(top, xs[-1])
        drawn += 1
    cdf.set_xscale("log")
    cdf.set_xlabel(f"latency (ms, {xlabel})")
    cdf.set_ylabel("cumulative fraction")
    cdf.set_ylim(0, 1.01)
    cdf.grid(True, which="both", alpha=0.3)
    spec.set_xscale("log")
    ticks = [q for q in SPECTRUM_TICKS if 1 / (1 - q) <= top * 1.0001] or [0.5]
    spec.set_xticks([1 / (1 - q) for q in ticks])
    spec.set_xticklabels([f"{q * 100:g}%" for q in ticks])
    spec.minorticks_off()
    spec.set_xlim(1, max(top, 2))
    spec.set_xlabel("percentile")
    spec.set_ylabel("latency (ms)")
    spec.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    if drawn:
        cdf.legend(loc="lower right")
        spec.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_cdf(doc: dict, path: str) -> None:
    """Latency CDF and percentile spectrum per priority as a PNG (needs
    matplotlib: pip install 'qstack[plot]')."""
    hs = {"high": Histogram.from_json(doc["histograms"]["high"]),
          "low": Histogram.from_json(doc["histograms"]["low"])}
    hs = {"all": Histogram.merged(hs.values()), **hs}
    styles = {"all": ("black", "-"), "high": ("tab:red", "-"), "low": ("tab:blue", "--")}
    cfg = doc["config"]
    draw_latency([(name, h, *styles[name]) for name, h in hs.items()],
                 f"qstack load: {cfg['protocol']}, {cfg['connections']:,} conns, "
                 f"{cfg['mode']}, high share {cfg['ratio']:g}", path)


def _write(path: str, text: str, what: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise ConfigError(f"cannot write {what} {path}: {e.strerror}") from None


def _write_stream(stream, text: str) -> None:
    """Write all of `text` to a stream, straight to its fd when it has one.

    A blocking write to a pipe returns short when the task has work to run
    on its way back to user space: an io_uring the load just tore down
    delivers its cancellations that way.  Seen in 1 of 5-10 `--json -`
    runs on the uring backend: the report cut at a pipe's 64 KiB boundary
    with exit status 0.  Looping over os.write keeps every byte.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):   # StringIO and the like
        stream.write(text)
        stream.flush()
        return
    stream.flush()
    data = memoryview(text.encode(getattr(stream, "encoding", None) or "utf-8"))
    while data:
        data = data[os.write(fd, data):]


def write_outputs(o, doc: dict, stdout=None) -> list[str]:
    """Write --cdf, --json and --plot; returns what was written (for the log)."""
    done = []
    hists = [Histogram.from_json(doc["histograms"]["high"]),
             Histogram.from_json(doc["histograms"]["low"])]
    if o.cdf:
        _write(o.cdf, cdf_text(doc["connections"]["connected"], hists), "--cdf")
        done.append(o.cdf)
    if o.json:
        text = json.dumps(doc, indent=1, allow_nan=False, default=_json_default) + "\n"
        if o.json == "-":
            _write_stream(stdout or sys.stdout, text)
        else:
            _write(o.json, text, "--json")
            done.append(o.json)
    if o.plot:
        plot_cdf(doc, o.plot)
        done.append(o.plot)
    return done


def _json_default(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    raise TypeError(type(v).__name__)
