"""``qstack load``: the command line of the load generator.

    qstack load --dest 127.0.0.1:8000 -c 1000 -s 2 -w 1 -e 1 -b 50 -l 64 -r 0.2 -d 30

registers with ``add_load_parser(sub)`` from qstack/cli.py.  Flags follow
MCC's (-c -s -w -e -b -l -r -d, --log-duration); see docs/LOAD.md for every
flag and output.  Bad values end as ``qstack: error: ...`` (ConfigError,
exit 2) before anything is opened; limits the plan would hit (open files per
process, source ports per address) are checked up front the same way.

Output streams: progress lines and the report go to stdout, unless
``--json -`` puts the JSON document there, in which case they go to stderr.
Exit status: 0 when the run completed and every reply checked out, 1 when it
failed (nothing connected, bad replies, more requests unanswered than
--max-lost allows, a load process died), 2 for bad
input, 130 when interrupted (the report of what was measured still prints).
"""

from __future__ import annotations

import argparse
import resource
import sys

from qstack.errors import ConfigError

__all__ = ["add_load_parser"]


def add_load_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "load", help="generate load: many connections, bursts, priorities (MCC-style)",
        description="Open many TCP connections to --dest and send fixed-size messages on an "
                    "MCC-style schedule (every connection once per epoch, in bursts), an "
                    "open-loop rate or a closed loop; report latency per priority from "
                    "HDR histograms. See docs/LOAD.md.")
    a = p.add_argument
    a("--dest", metavar="HOST:PORT", help="the server (a loopback address unless "
                                          "--allow-remote)")
    a("-c", "--connections", type=int, metavar="N", help="concurrent connections (default 100)")
    a("-s", "--setup", type=float, metavar="S",
      help="seconds over which to open them, evenly (default 1)")
    a("-w", "--wait", type=float, metavar="S",
      help="seconds to wait after the setup before sending (default 1)")
    a("-e", "--epoch", type=float, metavar="S",
      help="each connection sends once per epoch (default 1)")
    a("-b", "--burst", type=int, metavar="N",
      help="connections fire in blocks of N spread evenly over the epoch (default 1)")
    a("-l", "--length", type=int, metavar="BYTES",
      help="message length (default 64 for echo, 200 for iotep)")
    a("-r", "--ratio", type=float, metavar="R",
      help="share of high-priority messages, 0..1 (default 0.5)")
    a("-d", "--duration", type=float, metavar="S",
      help="seconds of the measured window (default 10)")
    a("--protocol", choices=("echo", "iotep"), help="message format (default echo)")
    a("--script", metavar="FILE.py",
      help="custom protocol: a Python file (or module) defining request(conn, seq, high) "
           "-> bytes and response(conn, data) -> (consumed, seqs); see docs/LOAD.md. "
           "-l is then the most bytes one message may have (default 4096), --reply-len "
           "the most unconsumed reply bytes per connection (default 65536)")
    a("--reply-len", type=int, metavar="BYTES",
      help="iotep: bytes in each reply to a request (default 146)")
    a("--rate", type=float, metavar="R",
      help="open loop: R messages/s in total instead of the epoch schedule; latency counts "
           "from each message's intended send time")
    a("--closed", action="store_true", default=None,
      help="closed loop: the next message as soon as the reply is in")
    a("--window", type=int, metavar="W",
      help="outstanding requests per connection (default 8; --closed: 1)")
    a("--grain", choices=("message", "connection"),
      help="draw the priority per message (default) or once per connection")
    a("--seed", type=int, metavar="N", help="seed of the priority draws (default 1)")
    a("--smp", type=int, metavar="P", help="load processes, each with its share (default 1)")
    a("--ips", type=int, metavar="K",
      help="bind to K source addresses 127.0.0.2... (more than one address's ports); "
           "ustack: the client stack owns K addresses from --ip on")
    a("--src", metavar="ADDR",
      help="with --ips: the first source address (default 127.0.0.2; with a "
           "non-loopback --dest, an address of this host in its subnet)")
    a("--warmup", type=float, metavar="S",
      help="seconds of sending before the measured window (default 0)")
    a("--drain", type=float, metavar="S",
      help="after the window, wait up to S s for outstanding replies (default 2)")
    a("--retry-delay", type=float, metavar="S",
      help="retry a failed or dropped connection after S s (default 1)")
    a("--connect-timeout", type=float, metavar="S",
      help="give up on one connect attempt after S s (default 5)")
    a("--connect-inflight", type=int, metavar="N",
      help="connects outstanding at once (default 256)")
    a("--reply-timeout", type=float, metavar="S",
      help="give up a request unanswered for S s: counted as lost, its slot freed "
           "(default 5; 0: never)")
    a("--max-lost", type=float, metavar="SHARE",
      help="share of requests that may go unanswered, 0..1 (default 0: any "
           "unanswered request fails the run)")
    a("--log-duration", type=float, metavar="S",
      help="print latency percentiles every S s of the window (default 10; 0: off)")
    a("--cdf", metavar="FILE", help="write HCMonitor's cdf.txt layout")
    a("--json", metavar="FILE", help="write the full report as JSON ('-': stdout)")
    a("--plot", metavar="FILE.png", help="draw the latency CDF per priority (matplotlib)")
    a("--quiet", "-q", action="store_true", default=None, help="no progress lines")
    a("--marks", action="store_true", default=None,
      help="print '#start' and '#end' on stdout as the window opens and closes")
    a("--spin", type=float, metavar="S",
      help="poll instead of sleeping when the next send is within S s (default 0)")
    a("--backend", choices=("kernel", "uring", "ustack"),
      help="the client's network stack, an entry of the server's transport table: kernel "
           "sockets under epoll (default), kernel sockets under io_uring (uring), or "
           "qstack's own TCP/IP (ustack: no file per connection; needs --ip, a device of "
           "its own, root)")
    a("--driver", choices=("tap", "dpdk", "memif"),
      help="ustack: the device driver (default tap; memif: shared memory with a "
           "`qstack serve --driver memif`)")
    a("--memif", metavar="PATH", help="ustack on memif: the socket of the server's memif link "
                                      "(a server of N cores has N links: give --smp N)")
    a("--eal", metavar="ARGS", help="ustack on dpdk: DPDK EAL arguments (a port: a --vdev "
                                    "such as net_memif0,role=client,...)")
    a("--tap", metavar="NAME", help="ustack: the TAP device (default qsl0; created if missing)")
    a("--ip", metavar="ADDR/PREFIX",
      help="ustack: the client stack's own address, e.g. 198.18.1.1/16; --dest must be in "
           "its subnet (or reached through --gateway)")
    a("--gateway", metavar="ADDR", help="ustack: the next hop for a --dest off the subnet")
    a("--loss", type=float, metavar="P",
      help="ustack: drop a share P of frames both ways (fault injection, default 0)")
    a("--allow-remote", action="store_true", help="allow a non-loopback --dest")
    a("--wait-server", type=float, metavar="S", default=0.0,
      help="before the run, wait up to S s for --dest to accept a connection (default 0: "
           "a closed port fails at once instead of being retried for the whole window)")
    a("--no-check", action="store_true",
      help="skip that check: connections refused are retried for the whole window "
           "(memif: skip the wait for the server's links and the check of --smp against them)")
    p.set_defaults(run=_load)


PROBE_TIMEOUT = 1.0     # seconds one probe connect may take


def probe(host: str, port: int, wait: float) -> str | None:
    """Connect once to host:port (again until ``wait`` s have passed); None if it
    accepted, else why not, in words."""
    import errno
    import socket
    import time
    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
                return None
        except socket.timeout:
            why = f"no answer within {PROBE_TIMEOUT:g} s"
        except OSError as e:
            why = ("connection refused: nothing listens there" if e.errno == errno.ECONNREFUSED
                   else e.strerror or str(e))
        if time.monotonic() >= deadline:
            return why
        time.sleep(0.1)


def memif_links(o, wait: float) -> str | None:
    """Wait up to `wait` s for the memif server at --memif; None once it is
    there with one link per load process.  A server of another number of
    links (cores) is a ConfigError: one load process per link, process k on
    link k, so --smp must equal the server's --cores.  Why not, if no
    server came."""
    from qstack import memif
    found = memif.wait_links(o.memif, wait)
    if not found:
        return (f"no memif server is accepting at {o.memif} after waiting {wait:g} s (start "
                f"`qstack serve --driver memif --memif {o.memif}` first, or pass --no-check "
                f"to let the engine wait 30 s for it)")
    if len(found) > 1:
        raise ConfigError(f"--memif {o.memif}: memif servers with "
                          f"{' and '.join(str(n) for n in sorted(found))} links both listen "
                          f"there ({', '.join(found.values())}); stop one")
    (n, at), = found.items()
    if n != o.smp:
        raise ConfigError(
            f"--smp {o.smp}: the memif server at {o.memif} has {n} link{'s' if n > 1 else ''}, "
            f"one per core ({at} is one); run --smp {n}: one load process per link")
    return None


FIELDS = ("connections", "setup", "wait", "epoch", "burst", "length", "ratio", "duration",
          "protocol", "reply_len", "script", "rate", "closed", "window", "grain", "seed", "smp", "ips",
          "src",
          "warmup", "drain", "retry_delay", "connect_timeout", "connect_inflight",
          "reply_timeout", "max_lost", "log_duration", "cdf", "json", "plot", "quiet", "marks", "spin",
          "backend", "driver", "eal", "memif", "tap", "ip", "gateway", "loss")


def options_from_args(args: argparse.Namespace):
    from qstack.loadgen.options import check_limits, parse_dest, validate
    # A ustack client's frames leave through its own device only, to --dest
    # on its own subnet (checked by validate); a gateway may lead further.
    ustack_local = args.backend == "ustack" and args.gateway is None
    host, port = parse_dest(args.dest, args.allow_remote or ustack_local)
    o = validate(host=host, port=port, **{f: getattr(args, f) for f in FIELDS})
    notes = check_limits(o, resource.getrlimit(resource.RLIMIT_NOFILE))
    if o.script:   # import and try it now: a bad script is one line and exit 2
        from qstack.loadgen import script
        script.install(script.load(o.script, o.length), o.length)
    if o.backend == "uring":     # refused (seccomp, a container, the sysctl): say so now
        from qstack.loadgen.engine import uring_refusal
        why = uring_refusal()
        if why:
            raise ConfigError(f"{why}; --backend kernel runs without it")
    if o.backend == "ustack" and o.driver == "tap":
        _check_ustack_device(o)
    if o.backend == "ustack" and o.driver in ("dpdk", "memif"):
        from qstack.loadgen.engine import dpdk_library
        if dpdk_library() is None:
            raise ConfigError(f"--driver {o.driver}: this build has no DPDK driver (qstack/_qsdpdk.so: "
                              "libdpdk was not found when qstack was built)")
    if o.plot:   # say so now, not after the run
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--plot needs matplotlib, which is not installed: "
                              "pip install 'qstack[plot]' (or pip install matplotlib)") from None
    return o, notes


def _check_ustack_device(o) -> None:
    """The ustack client opens a TAP device: say now if it cannot."""
    import os
    if not os.path.exists("/dev/net/tun"):
        raise ConfigError("--backend ustack: /dev/net/tun is missing (no TUN/TAP support here)")
    cap_net_admin = 1 << 12
    try:
        with open("/proc/self/status") as f:
            eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        eff = cap_net_admin if os.geteuid() == 0 else 0
    if not eff & cap_net_admin:
        raise ConfigError(f"--backend ustack: opening TAP device {o.tap} needs root "
                          f"(CAP_NET_ADMIN)")


def _load(args: argparse.Namespace) -> int:
    o, notes = options_from_args(args)
    try:
        from qstack.loadgen import report, runner
    except ImportError as e:   # the engine was never built
        raise ConfigError(f"the load engine (qstack._loadgen) is not built: run "
                          f"'python qstack/native/build_loadgen.py' or 'make build' ({e})") \
            from None
    human = sys.stderr if o.json == "-" else sys.stdout

    def say(line: str) -> None:
        print(line, file=human, flush=True)

    def mark(line: str) -> None:
        print(line, file=sys.stdout, flush=True)

    if args.wait_server < 0:
        raise ConfigError(f"--wait-server: expected seconds >= 0, got {args.wait_server:g}")
    # The kernel cannot reach a ustack client's destination (it is behind the
    # client's own device): its connects are retried until the window ends.
    why = None if args.no_check or o.backend == "ustack" else \
        probe(o.host, o.port, args.wait_server)
    if why is not None:
        waited = f" after waiting {args.wait_server:g} s" if args.wait_server else ""
        print(f"qstack load: cannot connect to {o.dest}{waited}: {why} (start the server "
              f"first, or pass --wait-server S to wait for it)", file=sys.stderr, flush=True)
        return 1
    if o.backend == "ustack" and o.driver == "memif" and not args.no_check:
        from qstack.memif import PEER_WAIT_S
        why = memif_links(o, max(args.wait_server, PEER_WAIT_S))
        if why is not None:
            print(f"qstack load: {why}", file=sys.stderr, flush=True)
            return 1
    if not o.quiet:
        say("qstack load: " + o.describe())
    for n in notes:
        say("note: " + n)
    doc = runner.run(o, printer=say, marks=mark if o.marks else None)
    if not o.quiet or doc["status"] != "ok":
        say(report.format_report(doc))
    for path in report.write_outputs(o, doc, stdout=sys.stdout):
        if not o.quiet:
            say(f"wrote {path}")
    if doc["status"] == "interrupted":
        return 130
    if doc.get("script_errors"):   # the script is broken, not the server
        return 2
    return 0 if doc["status"] == "ok" else 1
