"""Locust users for qstack's protocols: echo and iotep over plain TCP.

    locust -f loadtests/locustfile.py --headless -u 200 -r 50 -t 30s \\
        --host tcp://127.0.0.1:8000 [--protocol echo|iotep] [--high-ratio 0.05]

    # distributed: one master, any number of workers (here or on other hosts)
    locust -f loadtests/locustfile.py --master --headless -u 2000 -r 200 -t 60s \\
        --expect-workers 2 --host tcp://127.0.0.1:8000
    locust -f loadtests/locustfile.py --worker --master-host 127.0.0.1   # x 2

Self-contained: only Locust (which brings gevent) and the standard library.
Locust runs every user as a greenlet and patches the standard library with
gevent's monkey patching when it is imported, so ``socket`` here is gevent's
cooperative socket: a user blocked in ``recv`` costs its greenlet, not a
thread, and hundreds of users share one process.  Every user holds one TCP
connection, opened in ``on_start`` (and again after a failure), and sends one
message per ``--epoch`` seconds (constant pacing, MCC's epoch; 0 sends the
next message as soon as the reply is in).

Each message is high priority with probability ``--high-ratio`` (drawn per
message), marked in byte 5 as ``qstack load`` does (docs/LOAD.md): 0x01 high,
0x00 low.  Serve it with the same native rule::

    qstack serve apps.echo:handle --framing fixed:64 --priority offset=5,value=0x01

Every message fires one Locust request event, type ``echo`` or ``iotep`` and
name ``high`` or ``low``, so Locust's tables and charts show latency per
priority:

- **echo** (default): the reply must be the message itself, byte for byte
  (``--msg-len`` bytes, at least 16: sequence u32 LE, 0x51, priority, length
  u16 LE, user u32 LE, then a pattern).  Response time: send to last byte back.
- **iotep** (apps/iotepserver.py): byte 5 0x01 makes a request (high), else a
  heartbeat (low); only requests get a ``--reply-len``-byte reply (146 for
  iotepserver).  A request's response time is send to reply; a heartbeat
  expects no reply, so its event records the time of the send alone (the
  ``low`` row counts heartbeats sent, its times are not latency).

Failures (refused or reset connections, timeouts after ``--tcp-timeout``
seconds, a reply that is not the echo, EOF) fire a failed event with the
reason and reconnect on the next message.  See docs/LOCUST.md.
"""

import logging
import random
import socket
import struct
import sys
import time
from urllib.parse import urlsplit

from locust import User, events, task

MAGIC = 0x51
HIGH, LOW = 1, 0


@events.init_command_line_parser.add_listener
def _add_options(parser):
    group = parser        # locust's parser: include_in_web_ui works only here
    group.add_argument("--protocol", choices=("echo", "iotep"), default="echo",
                       include_in_web_ui=True, help="message format (default echo)")
    group.add_argument("--high-ratio", type=float, default=0.05, include_in_web_ui=True,
                       help="share of high-priority messages, 0..1 (default 0.05); "
                            "with iotep, the share of requests")
    group.add_argument("--msg-len", type=int, default=0, include_in_web_ui=True,
                       help="bytes per message (default 64 for echo, 200 for iotep)")
    group.add_argument("--reply-len", type=int, default=146, include_in_web_ui=True,
                       help="iotep: bytes in a request's reply (default 146)")
    group.add_argument("--epoch", type=float, default=1.0, include_in_web_ui=True,
                       help="seconds between two messages of one user (default 1; "
                            "0: next message as soon as the reply is in)")
    group.add_argument("--tcp-timeout", type=float, default=10.0,
                       help="seconds to wait for a connect or a reply (default 10)")


@events.init.add_listener
def _check_options(environment, **_kw):
    """Bad values stop the start with one line (exit 2), before any user runs."""
    o = environment.parsed_options
    if o is None:
        return                      # run as a library without a command line
    problems = []
    if not 0.0 <= o.high_ratio <= 1.0:
        problems.append(f"--high-ratio must be in 0..1, got {o.high_ratio}")
    low = 16 if o.protocol == "echo" else 9
    if o.msg_len and not low <= o.msg_len <= 65535:
        problems.append(f"--msg-len must be in {low}..65535 for {o.protocol}, "
                        f"got {o.msg_len}")
    if o.epoch < 0 or o.tcp_timeout <= 0 or not 0 <= o.reply_len <= 65535:
        problems.append("--epoch must be >= 0, --tcp-timeout > 0, --reply-len 0..65535")
    if not getattr(o, "worker", False):     # a worker gets the host from its master
        try:
            parse_host(o.host)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        logging.error("loadtests/locustfile.py: %s", "; ".join(problems))
        sys.exit(2)


def parse_host(host):
    """(host, port) from tcp://HOST:PORT or HOST:PORT."""
    if not host:
        raise ValueError("no host: pass --host tcp://HOST:PORT")
    url = urlsplit(host if "://" in host else "tcp://" + host)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"--host must be tcp://HOST:PORT, got {host!r}")
    return url.hostname, url.port


def echo_message(seq, user, high, length):
    """The echo layout of docs/LOAD.md; the server sends it back unchanged."""
    head = struct.pack("<IBBHI", seq & 0xFFFFFFFF, MAGIC, HIGH if high else LOW,
                       length & 0xFFFF, user & 0xFFFFFFFF)
    head += struct.pack("<I", (seq * 2654435761 + user) & 0xFFFFFFFF)
    return head + bytes((7 * i + 131 * user + 1) & 0xFF for i in range(16, length))


def iotep_message(seq, high, length):
    """MCC's IoT message: counter LE, byte 5 request/heartbeat, byte 6 = 2,
    byte 8 = 8 in heartbeats, zeros elsewhere."""
    msg = bytearray(length)
    msg[0:4] = struct.pack("<I", seq & 0xFFFFFFFF)
    msg[5] = HIGH if high else LOW
    msg[6] = 0x02
    if not high:
        msg[8] = 0x08
    return bytes(msg)


class ReplyError(Exception):
    """The server answered, but not what the protocol expects."""


class TcpUser(User):
    """One TCP connection sending qstack's echo or iotep messages."""

    _next_id = 0

    def wait_time(self):
        # constant pacing: one message per --epoch, whatever the reply took
        epoch = self.environment.parsed_options.epoch
        spent = time.monotonic() - self._task_started
        return max(0.0, epoch - spent)

    def on_start(self):
        o = self.environment.parsed_options
        self.protocol = o.protocol
        self.length = o.msg_len or (64 if self.protocol == "echo" else 200)
        self.high_ratio = o.high_ratio
        self.reply_len = o.reply_len
        self.timeout = o.tcp_timeout
        self.addr = parse_host(self.host)
        TcpUser._next_id += 1
        self.user_id = TcpUser._next_id
        self.seq = 0
        self.sock = None
        self._task_started = time.monotonic()

    def on_stop(self):
        self._close()

    def _close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def _connect(self):
        sock = socket.create_connection(self.addr, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeout)
        self.sock = sock

    def _recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ReplyError(f"connection closed by the server after {len(buf)} "
                                 f"of {n} reply bytes")
            buf += chunk
        return bytes(buf)

    def _fire(self, name, started, length, exc=None):
        self.environment.events.request.fire(
            request_type=self.protocol, name=name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length, exception=exc, context={})

    @task
    def send_one(self):
        self._task_started = time.monotonic()
        self.seq += 1
        high = random.random() < self.high_ratio
        name = "high" if high else "low"
        if self.protocol == "echo":
            msg = echo_message(self.seq, self.user_id, high, self.length)
            expect = len(msg)
        else:
            msg = iotep_message(self.seq, high, self.length)
            expect = self.reply_len if high else 0
        started = time.perf_counter()
        try:
            if self.sock is None:
                self._connect()
                started = time.perf_counter()     # connecting is not the message
            self.sock.sendall(msg)
            reply = self._recv_exact(expect) if expect else b""
            if self.protocol == "echo" and reply != msg:
                raise ReplyError("the echo differs from the message sent")
        except (OSError, ReplyError) as exc:
            self._close()
            self._fire(name, started, 0, exc)
            return
        self._fire(name, started, len(reply))
