"""The load generator's settings: validated once, split across processes.

Everything here is pure (no sockets, no engine): :func:`validate` turns the
parsed flags into a :class:`LoadOptions` or raises ConfigError with one line
naming the flag; :func:`check_limits` compares the plan with the machine's
limits (open files per process, source ports per address) and says plainly
what to change; :func:`split` and :func:`plan_processes` share connections
between --smp processes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import socket

from qstack import memif
from qstack.errors import ConfigError

PROTOCOLS = ("echo", "iotep", "script")   # script: --script FILE (script.py)
BACKENDS = ("kernel", "uring", "ustack")  # the transport under the engine (qsload.h)
USTACK_PORTS = (1024, 65535)              # a ustack client's own source ports: no kernel range
GRAINS = ("message", "connection")
# Open files a process needs besides its connections: stdio, the epoll fd,
# pipes to the parent, Python's own, some slack.
FD_RESERVE = 64
ECHO_MIN = 16     # qsload.h QSL_ECHO_HEADER
IOTEP_MIN = 9     # QSL_IOTEP_MIN
MAX_WINDOW = 64   # QSL_MAX_WINDOW
DEFAULT_LENGTH = {"echo": 64, "iotep": 200,   # iotep: apps/iotepserver's fixed:200
                  "script": 4096}              # script: room for one message
DEFAULT_REPLY_LEN = 146                        # QStack's iotepserver reply
SCRIPT_REPLY_LEN = 65536                       # script: room for unconsumed replies


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    host: str                 # IPv4 literal of the destination
    port: int
    connections: int = 100
    setup: float = 1.0        # -s: seconds to establish them
    wait: float = 1.0         # -w: idle seconds after setup
    epoch: float = 1.0        # -e
    burst: int = 1            # -b
    length: int = 64          # -l
    ratio: float = 0.5        # -r
    duration: float = 10.0    # -d: the measured window
    protocol: str = "echo"
    reply_len: int = DEFAULT_REPLY_LEN
    script: str | None = None # --script: file or module (protocol "script")
    rate: float = 0.0         # > 0: open loop
    closed: bool = False
    window: int = 8
    grain: str = "message"
    seed: int = 1
    smp: int = 1
    ips: int = 0
    src: str | None = None    # --ips: first source address (None: 127.0.0.2)
    warmup: float = 0.0
    drain: float = 2.0
    retry_delay: float = 1.0
    connect_timeout: float = 5.0
    connect_inflight: int = 256
    reply_timeout: float = 5.0   # give up a request unanswered this long (0: never)
    max_lost: float = 0.0        # share of requests that may go unanswered and still pass
    log_duration: float = 10.0
    spin: float = 0.0
    cdf: str | None = None
    json: str | None = None
    plot: str | None = None
    quiet: bool = False
    marks: bool = False
    # the backend: kernel sockets, or qstack's own TCP/IP stack (ustack) on
    # a device of its own, with an address of its own (--ip ADDR/PREFIX)
    backend: str = "kernel"
    driver: str = "tap"        # ustack: tap | dpdk | memif
    eal: str | None = None     # ustack on dpdk: the EAL arguments (e.g. a net_memif vdev)
    memif: str | None = None   # ustack on memif: the server's socket path (client role)
    tap: str = "qsl0"
    ip: str | None = None      # ustack: "198.18.1.1/16"
    gateway: str | None = None
    loss: float = 0.0          # ustack: injected loss, both ways (tests, like serve's)

    @property
    def mode(self) -> str:
        return "closed" if self.closed else "rate" if self.rate > 0 else "epoch"

    @property
    def dest(self) -> str:
        return f"{self.host}:{self.port}"

    def describe(self) -> str:
        sched = {"epoch": f"epoch {self.epoch:g} s, burst {self.burst}",
                 "rate": f"open loop {self.rate:,.0f} msg/s",
                 "closed": f"closed loop, {self.window} in flight per connection"}[self.mode]
        extra = (f", {self.smp} processes" if self.smp > 1 else "") + \
                (f", {self.ips} source addresses" if self.ips else "") + \
                (f", on ustack {self.ip} over " +
                 {"tap": f"tap {self.tap}", "memif": f"memif {self.memif}"}.get(self.driver,
                                                                                "dpdk")
                 if self.backend == "ustack" else "")
        proto = f"script {self.script}" if self.protocol == "script" else self.protocol
        size = f"up to {self.length} B" if self.protocol == "script" else f"{self.length} B"
        return (f"{proto} to {self.dest}: {self.connections:,} connections "
                f"(setup {self.setup:g} s, wait {self.wait:g} s), {sched}, "
                f"{size}, high share {self.ratio:g}, "
                f"{self.duration:g} s measured{extra}")


def ustack_net(ip: str | None) -> ipaddress.IPv4Interface:
    """--ip ADDR/PREFIX of a ustack client, checked."""
    if not ip:
        raise ConfigError("--backend ustack needs the client stack's own address: "
                          "--ip ADDR/PREFIX (e.g. --ip 198.18.1.1/16)")
    if "/" not in ip:
        raise ConfigError(f"--ip: expected ADDR/PREFIX (e.g. 198.18.1.1/16), got {ip!r}")
    try:
        net = ipaddress.IPv4Interface(ip)
    except ValueError:
        raise ConfigError(f"--ip: expected ADDR/PREFIX (e.g. 198.18.1.1/16), got {ip!r}") \
            from None
    if not 1 <= net.network.prefixlen <= 30:
        raise ConfigError(f"--ip: the prefix must be 1..30, got /{net.network.prefixlen}")
    if net.ip in (net.network.network_address, net.network.broadcast_address):
        raise ConfigError(f"--ip: {net.ip} is the network's own or broadcast address")
    return net


def parse_dest(text: str | None, allow_remote: bool = False) -> tuple[str, int]:
    if not text:
        raise ConfigError("--dest HOST:PORT is required (e.g. --dest 127.0.0.1:8000)")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--dest: expected HOST:PORT, got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--dest: the port must be a number, got {port_text!r}") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"--dest: the port must be in 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--dest: cannot resolve {host!r} to an IPv4 address ({e.strerror})") \
            from None
    addr = infos[0][4][0]
    if not allow_remote and not ipaddress.IPv4Address(addr).is_loopback:
        raise ConfigError(f"--dest {addr} is not a loopback address; pass --allow-remote "
                          "to load another machine")
    return addr, port


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(**kw) -> LoadOptions:
    """Build LoadOptions from flag values; raises ConfigError naming the flag."""
    if kw.get("script"):
        _need(kw.get("protocol") in (None, "script"),
              f"--script and --protocol {kw.get('protocol')} exclude each other")
        kw["protocol"] = "script"
        if kw.get("reply_len") is None:
            kw["reply_len"] = SCRIPT_REPLY_LEN
    protocol = kw.get("protocol") or "echo"
    _need(protocol != "script" or kw.get("script"), "--protocol script needs --script FILE")
    _need(protocol in PROTOCOLS, f"--protocol: expected one of {', '.join(PROTOCOLS)}, "
                                 f"got {protocol!r}")
    if kw.get("length") is None:
        kw["length"] = DEFAULT_LENGTH[protocol]
    if kw.get("window") is None:
        kw["window"] = 1 if kw.get("closed") else 8
    kw = {k: v for k, v in kw.items() if v is not None}
    o = LoadOptions(**kw)
    _need(o.connections >= 1, f"-c/--connections must be at least 1, got {o.connections}")
    _need(o.connections <= 10_000_000, f"-c/--connections: at most 10,000,000, got "
                                       f"{o.connections:,}")
    for flag, v in (("-s/--setup", o.setup), ("-w/--wait", o.wait), ("--warmup", o.warmup),
                    ("--drain", o.drain), ("--spin", o.spin),
                    ("--log-duration", o.log_duration)):
        _need(math.isfinite(v) and v >= 0, f"{flag} must be a number of seconds >= 0, got {v}")
    for flag, v in (("-d/--duration", o.duration), ("-e/--epoch", o.epoch),
                    ("--retry-delay", o.retry_delay), ("--connect-timeout", o.connect_timeout)):
        _need(math.isfinite(v) and v > 0, f"{flag} must be a number of seconds > 0, got {v}")
    _need(math.isfinite(o.reply_timeout) and o.reply_timeout >= 0,
          f"--reply-timeout must be a number of seconds >= 0, got {o.reply_timeout}")
    _need(0.0 <= o.max_lost <= 1.0,
          f"--max-lost is a share of requests, 0..1, got {o.max_lost}")
    _need(o.burst >= 1, f"-b/--burst must be at least 1, got {o.burst}")
    _need(0.0 <= o.ratio <= 1.0, f"-r/--ratio is a share of messages, 0..1, got {o.ratio}")
    minimum = {"echo": ECHO_MIN, "iotep": IOTEP_MIN, "script": 1}[protocol]
    _need(minimum <= o.length <= (65535 if protocol == "echo" else 1 << 24),
          f"-l/--length: {protocol} messages need {minimum}.."
          f"{65535 if protocol == 'echo' else 1 << 24} bytes, got {o.length}")
    _need(1 <= o.reply_len <= 1 << 24, f"--reply-len must be 1..{1 << 24}, got {o.reply_len}")
    _need(math.isfinite(o.rate) and o.rate >= 0, f"--rate must be messages per second >= 0, "
                                                 f"got {o.rate}")
    _need(not (o.closed and o.rate > 0), "--closed and --rate exclude each other")
    _need(1 <= o.window <= MAX_WINDOW, f"--window must be 1..{MAX_WINDOW}, got {o.window}")
    _need(o.grain in GRAINS, f"--grain: expected one of {', '.join(GRAINS)}, got {o.grain!r}")
    _need(0 <= o.seed < 2**64, f"--seed must be 0..2^64-1, got {o.seed}")
    _need(o.smp >= 1, f"--smp must be at least 1, got {o.smp}")
    _need(o.smp <= o.connections, f"--smp {o.smp} is more processes than connections "
                                  f"({o.connections})")
    _need(0 <= o.ips <= 60_000, f"--ips must be 0..60000, got {o.ips}")
    if o.src is not None:
        try:
            src = ipaddress.IPv4Address(o.src)
        except ValueError:
            raise ConfigError(f"--src: expected an IPv4 address, got {o.src!r}") from None
        _need(o.ips > 0, "--src names the first of the --ips source addresses: give --ips K")
        _need(src.is_loopback == ipaddress.IPv4Address(o.host).is_loopback,
              f"--src {o.src} and --dest {o.host} must both be loopback addresses or neither")
    _need(not o.ips or o.src or o.backend == "ustack" or
          ipaddress.IPv4Address(o.host).is_loopback,
          "--ips binds source addresses in 127.0.0.0/8, so --dest must be a loopback address "
          "(or give --src, the first of this host's addresses to use)")
    _need(o.connect_inflight >= 1, f"--connect-inflight must be at least 1, got "
                                   f"{o.connect_inflight}")
    _need(o.backend in BACKENDS, f"--backend: expected one of {', '.join(BACKENDS)}, "
                                 f"got {o.backend!r}")
    if o.backend == "ustack":
        _check_ustack(o)
    else:
        for flag, v in (("--ip", o.ip), ("--gateway", o.gateway), ("--memif", o.memif)):
            _need(v is None, f"{flag} is the ustack client's: give --backend ustack")
        _need(o.loss == 0, "--loss is injected by the ustack client: give --backend ustack")
    if o.plot and not o.plot.lower().endswith(".png"):
        raise ConfigError(f"--plot writes a PNG image: name it FILE.png, got {o.plot!r}")
    return o


def _check_ustack(o: LoadOptions) -> None:
    net = ustack_net(o.ip)
    _need(o.driver in ("tap", "dpdk", "memif"),
          f"--driver: expected tap, dpdk or memif, got {o.driver!r}")
    _need(o.driver != "memif" or o.memif, "--driver memif needs --memif PATH, the socket "
                                          "the server's `qstack serve --driver memif` made")
    _need(o.memif is None or o.driver == "memif", "--memif is for --driver memif")
    if o.memif is not None:
        why = memif.path_problem(o.memif, o.smp)
        _need(why is None, f"--memif: {why}")
    _need(0 < len(o.tap.encode()) < 16, f"--tap: a device name of 1..15 bytes, got {o.tap!r}")
    _need(o.driver != "dpdk" or o.eal, "--driver dpdk needs --eal ARGS, e.g. --eal '--no-huge "
                                       "-m 256 --no-pci --file-prefix qsl --vdev=net_memif0,"
                                       "role=client,socket=/run/qs.sock,socket-abstract=no'")
    _need(o.eal is None or o.driver == "dpdk", "--eal is for --driver dpdk")
    _need(o.eal is None or len(o.eal.encode()) < 1024, "--eal: at most 1023 bytes")
    _need(o.smp == 1 or o.driver == "memif",
          f"--smp: the ustack client on {o.driver} runs in one process (its stack owns the "
          f"device; --driver memif runs one per server core), got --smp {o.smp}")
    _need(o.src is None, "--src is the kernel client's; the ustack client's addresses are "
                         "--ip and --ips")
    dest = ipaddress.IPv4Address(o.host)
    first, last = ustack_sources(o)[0], ustack_sources(o)[-1]
    _need(last in net.network and last != net.network.broadcast_address,
          f"--ips {o.ips}: {first}..{last} does not fit in --ip's subnet {net.network} "
          f"(short of its broadcast address)")
    _need(not int(first) <= int(dest) <= int(last),
          f"--dest {dest} is one of the client stack's own addresses (--ip, --ips)")
    if o.gateway is not None:
        try:
            gw = ipaddress.IPv4Address(o.gateway)
        except ValueError:
            raise ConfigError(f"--gateway: expected an IPv4 address, got {o.gateway!r}") \
                from None
        _need(gw in net.network, f"--gateway {gw} is not in --ip's subnet {net.network}")
    else:
        _need(dest in net.network, f"--dest {dest} is not in --ip's subnet {net.network} "
                                   f"and no --gateway is given")
    _need(0.0 <= o.loss < 1.0, f"--loss is a share of frames, 0..1, got {o.loss}")


def ustack_sources(o: LoadOptions) -> list[ipaddress.IPv4Address]:
    """The ustack client's addresses: --ip and the next --ips - 1 (K in all,
    consecutive; the stack owns them all and answers ARP for each)."""
    ip = ipaddress.IPv4Interface(o.ip).ip
    return [ip + i for i in range(max(o.ips, 1))]


def source_addresses(k: int, first: str | None = None) -> list[str]:
    """K source addresses from `first` on (default 127.0.0.2, loopback only
    by construction), never .0 or .255 in the last octet."""
    start = ipaddress.IPv4Address(first or "127.0.0.2")
    out, n = [], int(start)
    while len(out) < k:
        a = ipaddress.IPv4Address(n)
        if n & 0xFF not in (0, 255):
            out.append(str(a))
        n += 1
    if first is None:
        assert all(ipaddress.IPv4Address(a) in ipaddress.IPv4Network("127.0.0.0/8")
                   for a in out)
    return out


def split(total: int, parts: int) -> list[int]:
    """total shared as evenly as possible, the first ones get the remainder."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def plan_processes(o: LoadOptions) -> list[tuple[int, int]]:
    """(first global connection, count) for each process."""
    out, first = [], 0
    for n in split(o.connections, o.smp):
        out.append((first, n))
        first += n
    return out


def _port_range(path="/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    try:
        with open(path) as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def check_limits(o: LoadOptions, nofile: tuple[int, int],
                 port_range: tuple[int, int] | None = None) -> list[str]:
    """Raise ConfigError for a plan the machine cannot hold; return notes.

    nofile is (soft, hard) RLIMIT_NOFILE; the soft limit is raised to what
    is needed (up to hard) before the processes start.
    """
    notes = []
    if o.backend == "ustack":
        return _check_ustack_limits(o)
    per_proc = max(n for _, n in plan_processes(o))
    need = per_proc + FD_RESERVE
    soft, hard = nofile
    if hard >= 0 and need > hard:
        usable = hard - FD_RESERVE
        smp = math.ceil(o.connections / max(usable, 1))
        raise ConfigError(
            f"{o.connections:,} connections in {o.smp} process(es) is {per_proc:,} per process, "
            f"which needs {need:,} open files, but the limit is {hard:,} per process "
            f"(ulimit -Hn); use --smp {smp} or more (each process holds its share), or raise "
            f"the hard limit")
    lo, hi = port_range or _port_range()
    ports = hi - lo + 1
    per_source = _check_source_ports(o, lo, hi, f"net.ipv4.ip_local_port_range {lo}-{hi}",
                                     " to spread them over 127.0.0.0/8")
    if not o.ips and o.connections > 5000 and ipaddress.IPv4Address(o.host).is_loopback:
        notes.append(f"{o.connections:,} connections with kernel-chosen source ports: connect() "
                     f"slows down as the ports fill up (the kernel searches for a free one); "
                     f"--ips 1 binds explicit ports and connects several times faster")
    if per_source > 0.9 * ports:
        notes.append(f"{per_source:,} of {ports:,} source ports per address in use: close to "
                     f"the limit (connections in TIME_WAIT count too); --ips spreads them")
    return notes


def _check_ustack_limits(o: LoadOptions) -> list[str]:
    """A ustack client holds no file per connection; its limit is 4-tuples:
    each of its source addresses has ports USTACK_PORTS to the destination."""
    lo, hi = USTACK_PORTS
    _check_source_ports(o, lo, hi, f"{lo}-{hi}", "")
    return []


def _check_source_ports(o: LoadOptions, lo: int, hi: int, where: str, how: str) -> int:
    """The source ports one address needs (connections over --ips), or a
    ConfigError when that is more than lo..hi holds."""
    ports = hi - lo + 1
    per_source = math.ceil(o.connections / max(o.ips, 1))
    if per_source > ports:
        k = math.ceil(o.connections / ports)
        raise ConfigError(
            f"{o.connections:,} connections to {o.dest} need {per_source:,} source ports per "
            f"source address, but one address has {ports:,} ({where}); use --ips {k} or "
            f"more{how}")
    return per_source
