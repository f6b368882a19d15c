"""``--metrics HOST:PORT``: the cores' stats snapshots as Prometheus metrics.

Every core already sends a cumulative snapshot (qstack.stats) once per
``server.stats_interval``.  ``Aggregate`` keeps the newest one per core
process and sums them at scrape time, so a scrape costs nothing on the cores
and the figures are at most one interval old.  A core process that exits
(crash, reload, stop) has its last counters folded into a base that later
processes add to: a restart never makes a counter go backwards.

Where it runs:

* ``--cores 2`` or more: in the supervisor.  The supervisor must stay a
  single-threaded process (it forks), so prometheus_client's threaded HTTP
  server is out; ``SelectorHTTP`` answers scrapes from the supervisor's own
  selector loop, non-blocking, each client bounded to ``CLIENT_TIMEOUT``.
* ``--cores 1`` (no supervisor): in the core itself, on a gevent server that
  takes a fresh snapshot per scrape.

prometheus_client renders the text format (``generate_latest``) from a
custom collector: no global registry, no process-wide state.

Latency: the native histogram has 328 buckets (8 per power of two of ns);
exported are the ``LATENCY_BUCKETS`` below, each counting the native buckets
whose upper bound is within it (a native bucket straddling a boundary counts
in the next one up, so a count is never flattering by more than 12.5%).
``_sum`` is estimated from bucket midpoints.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from qstack.errors import ConfigError
from qstack.stats import QS_LAT_BUCKETS, bucket_upper_ns

__all__ = ["Aggregate", "SelectorHTTP", "bind", "render", "serve_gevent"]

LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
                   0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CLIENT_TIMEOUT = 5.0
MAX_REQUEST = 16384

# Cumulative per-core counters: snapshot key -> (metric, help)
_SCALARS = {
    "accepted": ("qstack_connections_accepted", "connections accepted"),
    "errors": ("qstack_handler_errors", "handlers that raised or returned a bad reply"),
    "protocol_errors": ("qstack_protocol_errors",
                        "messages the native layer refused (each reset its connection)"),
    "accept_errors": ("qstack_accept_errors", "failed accept() calls"),
    "hub_blocks": ("qstack_hub_blocks",
                   "times a handler kept the hub from running past server.block_warning"),
    "dropped": ("qstack_shutdown_dropped_requests",
                "requests dropped because the shutdown grace period ran out"),
    "cpu_stack": ("qstack_stack_cpu_seconds", "CPU time of the network stack threads"),
    "cpu_hub": ("qstack_hub_cpu_seconds", "CPU time of the hub threads"),
}
_PER_LEVEL = {
    "requests": ("qstack_requests", "messages received"),
    "replies": ("qstack_replies", "replies written"),
    "bytes_in": ("qstack_received_bytes", "bytes of messages received"),
    "bytes_out": ("qstack_sent_bytes", "bytes of replies written"),
}
_NET_COUNTERS = {
    "rx_frames": ("qstack_ustack_rx_frames", "frames received by the user-space stack"),
    "tx_frames": ("qstack_ustack_tx_frames", "frames sent by the user-space stack"),
    "drops": ("qstack_ustack_dropped_frames", "frames dropped (driver or bad frames)"),
    "rexmit": ("qstack_ustack_retransmits", "TCP segments retransmitted"),
    "tlp": ("qstack_ustack_tail_loss_probes", "TCP tail loss probes sent (RFC 8985)"),
}


def _fold_buckets() -> list[int]:
    """native bucket index -> index into LATENCY_BUCKETS (len = +Inf)."""
    out = []
    for i in range(QS_LAT_BUCKETS):
        upper = bucket_upper_ns(i) / 1e9
        out.append(next((j for j, le in enumerate(LATENCY_BUCKETS) if upper <= le),
                        len(LATENCY_BUCKETS)))
    return out


_FOLD = _fold_buckets()
_MID = [(bucket_upper_ns(i - 1) + 1 + bucket_upper_ns(i)) / 2e9 if i else 0.0
        for i in range(QS_LAT_BUCKETS)]


class _Totals:
    """Sums of cumulative counters over any number of snapshots."""

    def __init__(self) -> None:
        self.scalars: dict[str, float] = dict.fromkeys(_SCALARS, 0)
        self.levels: list[dict[str, Any]] = []
        self.net: dict[str, int] = {}
        self.counters: dict[str, list[int]] = {}

    def add(self, snap: dict) -> None:
        for key in _SCALARS:
            self.scalars[key] += snap.get(key) or 0
        for lv, level in enumerate(snap.get("levels", ())):
            while len(self.levels) <= lv:
                self.levels.append({**dict.fromkeys(_PER_LEVEL, 0), "lat": [0] * QS_LAT_BUCKETS})
            mine = self.levels[lv]
            for key in _PER_LEVEL:
                mine[key] += level.get(key, 0)
            mine["lat"] = [a + b for a, b in zip(mine["lat"], level.get("lat", ()))]
        for key, value in (snap.get("net") or {}).items():
            if key in _NET_COUNTERS:
                self.net[key] = self.net.get(key, 0) + value
        for name, values in (snap.get("counters") or {}).items():
            mine = self.counters.setdefault(name, [])
            mine.extend([0] * (len(values) - len(mine)))
            for lv, v in enumerate(values):
                mine[lv] += v


class Aggregate:
    """The newest snapshot of every live core process, plus what exited ones left.

    ``key`` identifies a core process (its pid): a core index is reused by
    its replacement, whose counters start again at zero.
    """

    def __init__(self, cores: int = 1) -> None:
        self.cores = cores
        self.live: dict[int, dict] = {}
        self.base = _Totals()
        self.restarts = [0] * cores

    def update(self, key: int, snap: dict) -> None:
        self.live[key] = snap

    def retire(self, key: int) -> None:
        """The process ``key`` exited: keep its counters, drop its gauges."""
        snap = self.live.pop(key, None)
        if snap is not None:
            self.base.add(snap)

    def restarted(self, core: int) -> None:
        if 0 <= core < len(self.restarts):
            self.restarts[core] += 1

    def collect(self) -> Iterable:
        totals = _Totals()
        totals.scalars = dict(self.base.scalars)
        totals.add({"levels": self.base.levels, "net": self.base.net,
                    "counters": self.base.counters})
        for snap in self.live.values():
            totals.add(snap)
        live = list(self.live.values())

        def gauge(name, text, value, labels=None, label_values=()):
            g = GaugeMetricFamily(name, text, labels=labels)
            if labels:
                for lv, v in label_values:
                    g.add_metric(lv, v)
            else:
                g.add_metric([], value)
            return g

        yield gauge("qstack_cores", "core processes running (and reporting)", len(live))
        yield gauge("qstack_connections_open", "connections open",
                    sum(s.get("conns", 0) for s in live))
        yield gauge("qstack_paused_connections",
                    "connections not read because their level's queue is full",
                    sum(s.get("paused_conns", 0) for s in live))
        yield gauge("qstack_buffers_in_use", "pool buffers in use",
                    sum(s.get("bufs_in_use", 0) for s in live))
        yield gauge("qstack_buffers_total", "pool buffers",
                    sum(s.get("bufs_total", 0) for s in live))
        nlevels = max([len(s.get("levels", ())) for s in live] + [len(totals.levels)])
        queued = [0] * nlevels
        for s in live:
            for lv, level in enumerate(s.get("levels", ())):
                queued[lv] += level.get("queued", 0)
        yield gauge("qstack_queue_depth", "messages waiting per level", 0, ["level"],
                    [([str(lv)], q) for lv, q in enumerate(queued)])
        for key, (name, text) in _SCALARS.items():
            c = CounterMetricFamily(name, text)
            c.add_metric([], totals.scalars[key])
            yield c
        c = CounterMetricFamily("qstack_core_restarts", "core processes restarted after "
                                "a crash", labels=["core"])
        for core, n in enumerate(self.restarts):
            c.add_metric([str(core)], n)
        yield c
        for key, (name, text) in _PER_LEVEL.items():
            c = CounterMetricFamily(name, text, labels=["level"])
            for lv, level in enumerate(totals.levels):
                c.add_metric([str(lv)], level[key])
            yield c
        h = HistogramMetricFamily("qstack_request_latency_seconds",
                                  "message received to reply written", labels=["level"])
        for lv, level in enumerate(totals.levels):
            counts = [0] * (len(LATENCY_BUCKETS) + 1)
            total_s = 0.0
            for i, n in enumerate(level["lat"]):
                if n:
                    counts[_FOLD[i]] += n
                    total_s += n * _MID[i]
            cumulative, running = [], 0
            for j, le in enumerate(LATENCY_BUCKETS + (float("inf"),)):
                running += counts[j]
                cumulative.append((_le(le), running))
            h.add_metric([str(lv)], cumulative, total_s)
        yield h
        if totals.net or any(s.get("net") for s in live):
            for key, (name, text) in _NET_COUNTERS.items():
                c = CounterMetricFamily(name, text)
                c.add_metric([], totals.net.get(key, 0))
                yield c
            yield gauge("qstack_ustack_connections", "TCP control blocks in use",
                        sum((s.get("net") or {}).get("tcbs", 0) for s in live))
        if totals.counters:
            c = CounterMetricFamily("qstack_app_events", "the app's qstack.count() counters",
                                    labels=["name", "level"])
            for name in sorted(totals.counters):
                for lv, v in enumerate(totals.counters[name]):
                    c.add_metric([name, str(lv)], v)
            yield c


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def render(aggregate: Aggregate) -> bytes:
    """The Prometheus text exposition of ``aggregate``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(aggregate)  # type: ignore[arg-type]  (has collect())
    return generate_latest(registry)


def _response(request: bytes, body: Callable[[], bytes]) -> bytes:
    line = request.split(b"\r\n", 1)[0].split()
    if len(line) < 2 or line[0] not in (b"GET", b"HEAD"):
        return _http(405, b"method not allowed\n", "text/plain")
    path = line[1].split(b"?", 1)[0]
    if path not in (b"/", b"/metrics"):
        return _http(404, b"not found: try /metrics\n", "text/plain")
    data = body()
    return _http(200, b"" if line[0] == b"HEAD" else data, CONTENT_TYPE_LATEST, len(data))


def _http(status: int, body: bytes, ctype: str, length: int | None = None) -> bytes:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
    head = (f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n"
            f"Connection: close\r\n\r\n")
    return head.encode() + body


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def bind(listen: str) -> socket.socket:
    """A listening socket for ``metrics.listen``; ConfigError if it cannot be had."""
    host, port = parse_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"metrics.listen: cannot resolve host {host!r}: {e.strerror}") \
            from None
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(64)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"metrics.listen: port {port} on {host} is already in use") \
                from None
        raise ConfigError(f"metrics.listen: cannot listen on {listen}: {e.strerror}") from None
    return sock


class SelectorHTTP:
    """Scrapes answered from a selector loop (the supervisor's), never blocking it.

    Keys it registers carry a callable as their data: the loop calls
    ``key.data()`` when one is ready.  ``expire(now)`` drops clients older
    than CLIENT_TIMEOUT; the loop wakes at least once a second to call it.
    """

    def __init__(self, sock: socket.socket, body: Callable[[], bytes]) -> None:
        self.sock = sock
        self.body = body
        self.sel: selectors.BaseSelector | None = None
        self.clients: dict[socket.socket, list] = {}   # sock -> [started, inbuf, outbuf]
        sock.setblocking(False)

    def attach(self, sel: selectors.BaseSelector) -> None:
        self.sel = sel
        sel.register(self.sock, selectors.EVENT_READ, self._accept)

    def close(self) -> None:
        """Close every socket (also in a forked child, which must not hold them)."""
        for c in list(self.clients):
            self._drop(c)
        if self.sel is not None:
            try:
                self.sel.unregister(self.sock)
            except (KeyError, ValueError):
                pass
        self.sock.close()

    def close_in_child(self) -> None:
        for c in list(self.clients):
            c.close()
        self.sock.close()

    def expire(self, now: float) -> None:
        for c, state in list(self.clients.items()):
            if now - state[0] > CLIENT_TIMEOUT:
                self._drop(c)

    def _accept(self) -> None:
        for _ in range(16):
            try:
                c, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            c.setblocking(False)
            self.clients[c] = [time.monotonic(), b"", b""]
            assert self.sel is not None
            self.sel.register(c, selectors.EVENT_READ, lambda c=c: self._ready(c))

    def _ready(self, c: socket.socket) -> None:
        state = self.clients.get(c)
        if state is None:
            return
        try:
            if not state[2]:
                data = c.recv(4096)
                if not data:
                    self._drop(c)
                    return
                state[1] += data
                if b"\r\n\r\n" not in state[1] and len(state[1]) < MAX_REQUEST:
                    return
                state[2] = _response(state[1], self.body)
                assert self.sel is not None
                self.sel.modify(c, selectors.EVENT_WRITE, lambda c=c: self._ready(c))
            sent = c.send(state[2])
            state[2] = state[2][sent:]
            if not state[2]:
                self._drop(c)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)

    def _drop(self, c: socket.socket) -> None:
        self.clients.pop(c, None)
        if self.sel is not None:
            try:
                self.sel.unregister(c)
            except (KeyError, ValueError):
                pass
        c.close()


def serve_gevent(sock: socket.socket, body: Callable[[], bytes]):
    """Answer scrapes on ``sock`` from gevent greenlets (the single-core case).

    Returns the started gevent StreamServer; ``stop()`` it when done.
    """
    import gevent
    from gevent.server import StreamServer

    def handle(c, _addr):
        buf = b""
        with gevent.Timeout(CLIENT_TIMEOUT, False):
            while b"\r\n\r\n" not in buf and len(buf) < MAX_REQUEST:
                data = c.recv(4096)
                if not data:
                    return
                buf += data
            c.sendall(_response(buf, body))

    from gevent import socket as gsocket

    family, type_ = sock.family, sock.type
    listener = gsocket.socket(family, type_, fileno=sock.detach())
    server = StreamServer(listener, handle)
    server.start()
    return server
