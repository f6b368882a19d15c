"""``qstack monitor``: request latency on the wire, as QStack's HCMonitor sees it.

    qstack monitor --port 8000 [--iface lo] [-d 20] [--warmup 4] [--cdf FILE]

A load generator measures from a message's intended send time to the moment
it reads the reply, so its figure also holds the time the generator spent
sending the rest of a burst and reading the replies ahead of this one.  On a
testbed those are the client machines' business; on one machine they share
the server's CPUs.  QStack reports its 2.4 ms p99 from HCMonitor, which
watches a mirror of the server's port and times a request from its packet to
its reply's packet.  This is that view: a packet socket on the server's
interface with a classic BPF filter that passes only TCP segments with
payload, to or from --port, in one direction of the interface (on loopback
every packet passes twice), stamped by the kernel (SO_TIMESTAMPNS) as it
goes by, so the monitor's own scheduling does not enter the figure.

Protocol: iotep (MCC's IoT format, as ``qstack load --protocol iotep``).  A
client message is --length bytes, a request when byte --offset equals
--value; bytes 0..3 carry the device's counter and the reply (--reply-len
bytes) echoes it, so a reply is matched to its request by (connection,
counter) when it echoes the counter; a fixed reply (QStack's iotepserver
sends one) answers the connection's oldest unanswered request, as ``qstack
load`` matches them.  A segment whose payload
is not a whole number of messages is counted as ``unparsed`` and skipped.

Requests whose packet falls in the measured window [warmup, warmup +
duration) are timed; the monitor then waits --drain seconds for their
replies, and reports those that never came as ``unanswered``.  Drops by the
kernel (a full socket buffer) are read from PACKET_STATISTICS and reported:
a run with drops has holes.  Needs CAP_NET_RAW.
"""

from __future__ import annotations

import argparse
import ctypes
import select
import socket
import struct
import sys
import time

from qstack.errors import ConfigError
from qstack.loadgen.hist import Histogram

__all__ = ["IotepMatcher", "WireMonitor", "add_monitor_parser", "tcp_payload_filter"]

ETH_P_IP = 0x0800
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0
SKF_AD_PKTTYPE = 4
ETH_P_ALL = 0x0003

# classic BPF opcodes (linux/filter.h)
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS = 0x20, 0x28, 0x30
_LD_H_IND, _LD_B_IND = 0x48, 0x50
_LDX_B_MSH, _LDX_MEM = 0xB1, 0x61
_ST = 0x02
_ALU_AND_K, _ALU_RSH_K, _ALU_ADD_X = 0x54, 0x74, 0x0C
_JEQ_K, _JGT_X = 0x15, 0x2D
_RET_K = 0x06


def tcp_payload_filter(port: int, outgoing: bool) -> list[tuple[int, int, int, int]]:
    """Classic BPF over a cooked (SOCK_DGRAM) IPv4 packet: keep TCP segments
    with payload whose source or destination port is ``port``, seen in one
    direction of the interface (outgoing, or everything but outgoing)."""
    keep, drop = 0xFFFF, 0
    prog = [
        (_LD_W_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_PROTOCOL) & 0xFFFFFFFF),
        (_JEQ_K, 0, 0, ETH_P_IP),                # patched below
        (_LD_W_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_PKTTYPE) & 0xFFFFFFFF),
        # pkttype == OUTGOING: fall through when it matches what we want
        (_JEQ_K, 0, 0, PACKET_OUTGOING),         # patched below
        (_LD_B_ABS, 0, 0, 9),                    # IP protocol
        (_JEQ_K, 0, 0, socket.IPPROTO_TCP),      # patched below
        (_LDX_B_MSH, 0, 0, 0),                   # X = IP header length
        (_LD_H_IND, 0, 0, 0),                    # source port
        (_JEQ_K, 0, 0, port),                    # patched: to the payload check
        (_LD_H_IND, 0, 0, 2),                    # destination port
        (_JEQ_K, 0, 0, port),                    # patched
        (_LD_B_IND, 0, 0, 12),                   # TCP data offset << 4
        (_ALU_AND_K, 0, 0, 0xF0),
        (_ALU_RSH_K, 0, 0, 2),                   # A = TCP header length
        (_ALU_ADD_X, 0, 0, 0),                   # A = IP + TCP header length
        (_ST, 0, 0, 0),
        (_LD_H_ABS, 0, 0, 2),                    # A = IP total length
        (_LDX_MEM, 0, 0, 0),
        (_JGT_X, 0, 0, 0),                       # payload?
        (_RET_K, 0, 0, keep),
        (_RET_K, 0, 0, drop),
    ]
    drop_at = len(prog) - 1

    def jump(i, jt, jf):
        code, _, _, k = prog[i]
        prog[i] = (code, jt - i - 1, jf - i - 1, k)

    jump(1, 2, drop_at)
    if outgoing:
        jump(3, 4, drop_at)
    else:
        jump(3, drop_at, 4)
    jump(5, 6, drop_at)
    jump(8, 11, 9)
    jump(10, 11, drop_at)
    jump(18, drop_at - 1, drop_at)
    return prog


def _attach(sock: socket.socket, prog) -> None:
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw)
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class IotepMatcher:
    """Pairs iotep requests with their replies from captured segments (pure:
    no socket, so it is tested with packets built in the test)."""

    def __init__(self, port: int, length: int = 200, reply_len: int = 146,
                 offset: int = 5, value: int = 0x01):
        self.port, self.length, self.reply_len = port, length, reply_len
        self.offset, self.value = offset, value
        self.hist = Histogram()
        self.pending: dict[tuple[bytes, int], list[list]] = {}   # conn -> [[counter, ts]]
        self.requests = self.heartbeats = self.replies = 0
        self.unmatched = self.unparsed = 0
        self.window = (0, 1 << 62)

    def packet(self, data: bytes, ts: int) -> None:
        """One captured IPv4 packet (a TCP segment with payload), stamped ``ts`` ns."""
        ihl = (data[0] & 0x0F) * 4
        total = (data[2] << 8) | data[3]
        sport, dport = struct.unpack_from("!HH", data, ihl)
        start = ihl + (data[ihl + 12] >> 4) * 4
        payload = memoryview(data)[start:total]
        if dport == self.port:
            self._from_client(data[12:16], sport, payload, ts)
        elif sport == self.port:
            self._from_server(data[16:20], dport, payload, ts)

    def _from_client(self, ip: bytes, port: int, payload, ts: int) -> None:
        n, rest = divmod(len(payload), self.length)
        if rest:
            self.unparsed += 1
            return
        lo, hi = self.window
        for i in range(0, n * self.length, self.length):
            if payload[i + self.offset] != self.value:
                self.heartbeats += 1
                continue
            if lo <= ts < hi:
                counter = bytes(payload[i:i + 4])
                waiting = self.pending.setdefault((ip, port), [])
                if all(c != counter for c, _ in waiting):   # a retransmission keeps the first
                    waiting.append([counter, ts])
                    self.requests += 1

    def _from_server(self, ip: bytes, port: int, payload, ts: int) -> None:
        n, rest = divmod(len(payload), self.reply_len)
        if rest:
            self.unparsed += 1
            return
        waiting = self.pending.get((ip, port))
        for i in range(0, n * self.reply_len, self.reply_len):
            if not waiting:
                self.unmatched += 1             # asked before the window, or a retransmission
                continue
            counter = bytes(payload[i:i + 4])
            at = next((j for j, (c, _) in enumerate(waiting) if c == counter), 0)
            self.replies += 1
            self.hist.record(max(0, ts - waiting.pop(at)[1]))

    def summary(self, drops: int = 0) -> dict:
        q = dict(zip(("p50", "p90", "p99", "p999", "max"),
                     self.hist.quantiles((0.5, 0.9, 0.99, 0.999, 1.0))))
        return {"requests": self.requests, "replies": self.replies,
                "unanswered": sum(map(len, self.pending.values())),
                "heartbeats": self.heartbeats, "unmatched_replies": self.unmatched,
                "unparsed_segments": self.unparsed, "kernel_drops": drops,
                "latency_ns": q, "hist": self.hist.to_json()}


class WireMonitor:
    """Captures the server port's segments on an interface into an IotepMatcher."""

    def __init__(self, matcher: IotepMatcher, iface: str = "lo", outgoing: bool = True):
        self.matcher = matcher
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        except PermissionError:
            raise ConfigError("qstack monitor needs CAP_NET_RAW (run it as root)") from None
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            _attach(self.sock, tcp_payload_filter(matcher.port, outgoing))
            self.sock.bind((iface, ETH_P_ALL))   # host order here; only ETH_P_ALL sees outgoing packets
        except OSError as e:
            self.sock.close()
            raise ConfigError(f"cannot watch interface {iface!r}: {e.strerror}") from None
        self.sock.setblocking(False)
        self.drops = 0
        self._stats()                           # reading the counters resets them

    def _stats(self) -> tuple[int, int]:
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        return struct.unpack("II", raw)

    def run(self, duration: float, warmup: float = 0.0, drain: float = 1.0) -> dict:
        """Watch for warmup + duration + drain seconds; return the summary."""
        t0 = time.time_ns()
        self.matcher.window = (t0 + int(warmup * 1e9), t0 + int((warmup + duration) * 1e9))
        end = t0 + int((warmup + duration + drain) * 1e9)
        buf = bytearray(65536)
        anc = socket.CMSG_SPACE(16)
        packet = self.matcher.packet
        while (now := time.time_ns()) < end:
            select.select([self.sock], [], [], min(0.2, (end - now) / 1e9))
            while True:
                try:
                    n, ancdata, _flags, _addr = self.sock.recvmsg_into([buf], anc)
                except BlockingIOError:
                    break
                ts = time.time_ns()
                for level, kind, cdata in ancdata:
                    if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS:
                        sec, nsec = struct.unpack("qq", cdata[:16])
                        ts = sec * 1_000_000_000 + nsec
                if n >= 40:
                    packet(bytes(buf[:n]), ts)
        self.drops += self._stats()[1]
        return self.matcher.summary(self.drops)

    def close(self) -> None:
        self.sock.close()


def format_summary(s: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v / 1e6:.3f}"
    q = s["latency_ns"]
    return (f"wire requests {s['requests']} replied {s['replies']} unanswered {s['unanswered']} "
            f"(heartbeats {s['heartbeats']}, unparsed {s['unparsed_segments']}, "
            f"kernel drops {s['kernel_drops']})\n"
            f"wire latency ms: p50 {ms(q['p50'])} p90 {ms(q['p90'])} p99 {ms(q['p99'])} "
            f"p99.9 {ms(q['p999'])} max {ms(q['max'])}")


def add_monitor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "monitor", help="time requests on the wire, from packet to reply packet (HCMonitor)",
        description="Watch an interface and time each iotep request from its packet to its "
                    "reply's packet, as QStack's HCMonitor does on a mirror port. Needs "
                    "CAP_NET_RAW. See docs/LOAD.md.")
    a = p.add_argument
    a("--port", type=int, required=True, help="the server's TCP port")
    a("--iface", default="lo", help="interface to watch (default lo)")
    a("-d", "--duration", type=float, default=10.0, help="seconds of the measured window")
    a("--warmup", type=float, default=0.0, help="seconds before the window opens")
    a("--drain", type=float, default=1.0, help="seconds to wait for the window's replies")
    a("-l", "--length", type=int, default=200, help="client message length (default 200)")
    a("--reply-len", type=int, default=146, help="reply length (default 146)")
    a("--offset", type=int, default=5, help="byte that marks a request (default 5)")
    a("--value", type=lambda s: int(s, 0), default=0x01, help="its value (default 0x01)")
    a("--json", metavar="FILE", help="write the summary and histogram as JSON")
    p.set_defaults(run=_monitor)


def _monitor(args: argparse.Namespace) -> int:
    import json
    for name in ("duration", "warmup", "drain"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be >= 0")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a TCP port")
    if args.length < 4 or args.reply_len < 4 or not 0 <= args.offset < args.length:
        raise ConfigError("--length and --reply-len need >= 4 bytes, --offset inside the message")
    matcher = IotepMatcher(args.port, args.length, args.reply_len, args.offset, args.value)
    mon = WireMonitor(matcher, args.iface)
    try:
        s = mon.run(args.duration, args.warmup, args.drain)
    except KeyboardInterrupt:
        s = matcher.summary(mon.drops)
    finally:
        mon.close()
    print(format_summary(s), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f)
    return 0 if s["kernel_drops"] == 0 else 1
