"""`qstack serve --backend ustack` against Linux's own TCP, beyond the shared
suite (test_server.py runs that on both backends): bulk data under injected
loss, hostile frames, and more connections than a process may hold files.

Each test gets a network namespace with a TAP device (tests/netns.py); the
server and the kernel clients run inside it, and nothing leaves it.
"""

import hashlib
import shutil
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, recv_exact
from netns import KERNEL_IP, STACK_IP, TapNetns, why_not

pytestmark = pytest.mark.skipif(why_not() is not None, reason=str(why_not()))


@pytest.fixture
def ustack(serve):
    """(net, start): start(app, *args) serves on the user-space stack."""
    net = TapNetns()
    try:
        with net.entered():
            yield net, lambda app, *args, **kw: serve(app, *args, ustack=["--tap", net.dev],
                                                      **kw)
            serve.stop_all()
    finally:
        net.close()


def _stream(seed, total, chunk=1 << 16):
    """Deterministic pseudo-random bytes, chunk by chunk (no 100 MB in memory)."""
    rng = random.Random(seed)
    left = total
    while left:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


def _final_net_line(stderr):
    line = next(l for l in stderr.splitlines() if " ustack: " in l)
    words = line.split()
    def before(word):
        return int(words[words.index(word) - 1].rstrip(","))
    return {"rx": before("frames"), "dropped": before("dropped,"),
            "rexmit": before("retransmitted,")}


def test_100mb_echo_sha256_under_injected_loss(ustack, tmp_path):
    net, start = ustack
    conf = tmp_path / "lossy.yaml"
    conf.write_text("ustack:\n  loss: 0.01\n  corrupt: 0.001\n  fault_seed: 7\n")
    server = start("apps.echo:handle", "--config", str(conf))
    total = 100 << 20
    sock = socket.create_connection(server.addr, timeout=60)
    sent, got = hashlib.sha256(), hashlib.sha256()
    errors = []

    def sender():
        try:
            for chunk in _stream(1, total):
                sent.update(chunk)
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(exc)

    t = threading.Thread(target=sender, daemon=True)
    t0 = time.monotonic()
    t.start()
    n = 0
    while True:
        data = sock.recv(1 << 20)
        if not data:
            break
        got.update(data)
        n += len(data)
    t.join(60)
    sock.close()
    wall = time.monotonic() - t0
    assert not errors, errors
    assert n == total, f"{n} of {total} bytes came back in {wall:.1f}s"
    assert got.hexdigest() == sent.hexdigest()
    assert server.stop() == 0
    stats = _final_net_line(server.stderr)
    assert stats["rexmit"] > 0, server.stderr[-1500:]      # the loss was real
    assert stats["dropped"] > 0                            # corrupted frames were caught
    assert "packet buffers in use 0" in server.stderr


# --- hostile frames ---------------------------------------------------------------

def _csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ip(src, dst, payload, proto=6, bad_csum=False):
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))
    c = _csum(head) ^ (0x5555 if bad_csum else 0)
    return head[:10] + struct.pack("!H", c) + head[12:] + payload


def _tcp(src, dst, sport, dport, seq, ack, flags, payload=b"", options=b"", bad_csum=False,
         doff=None):
    doff = doff if doff is not None else (20 + len(options)) // 4
    head = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, 65535, 0, 0)
    seg = head + options + payload
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(seg))
    c = _csum(pseudo + seg) ^ (0x1234 if bad_csum else 0)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def _stack_mac(net):
    out = net.run("ip", "neigh", "show", STACK_IP, "dev", net.dev).stdout.decode().split()
    return bytes(int(x, 16) for x in out[out.index("lladdr") + 1].split(":"))


def test_hostile_frames_never_hurt_a_live_connection(ustack):
    net, start = ustack
    server = start("apps.echo:handle")
    good = socket.create_connection(server.addr, timeout=10)
    good.sendall(b"before")
    assert recv_exact(good, 6) == b"before"
    sport = good.getsockname()[1]
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    raw.bind((net.dev, 0))
    dst = _stack_mac(net)
    src = raw.getsockname()[4]                 # the kernel side's own MAC
    rng = random.Random(5)

    sent = 0

    def frame(payload, ethertype=0x0800):
        nonlocal sent
        raw.send(dst + src + struct.pack("!H", ethertype) + payload)
        sent += 1
        if sent % 250 == 0:
            # An echo on the live connection queues behind these frames on
            # the TAP device (FIFO): once it is answered the stack has read
            # them all, so a busy machine cannot overflow the device's queue
            # and lose frames before the stack sees (and counts) them.
            good.sendall(b"s")
            assert recv_exact(good, 1) == b"s"

    k = KERNEL_IP
    for _ in range(2000):                      # garbage of every length
        frame(rng.randbytes(rng.randrange(0, 1500)), rng.choice((0x0800, 0x0806, 0x86DD)))
    for _ in range(500):                       # bad IPv4 header checksums
        frame(_ip(k, STACK_IP, _tcp(k, STACK_IP, 40000, 8000, 1, 0, 0x02), bad_csum=True))
    for _ in range(500):                       # bad TCP checksums, with data
        frame(_ip(k, STACK_IP, _tcp(k, STACK_IP, sport, 8000, rng.getrandbits(32),
                                    rng.getrandbits(32), 0x18, b"x" * 100, bad_csum=True)))
    for _ in range(500):                       # truncated options, data offset past the end
        opts = bytes([2, 4, 5]) + bytes([3])   # MSS cut short, a lone window-scale kind
        frame(_ip(k, STACK_IP, _tcp(k, STACK_IP, 40001, 8000, 1, 0, 0x02,
                                    options=opts.ljust(4, b"\0"), doff=15)))
    for _ in range(2000):                      # out-of-window RSTs at the live connection
        frame(_ip(k, STACK_IP, _tcp(k, STACK_IP, sport, 8000, rng.getrandbits(32), 0, 0x04)))
    for i in range(5000):                      # a SYN flood from spoofed ports
        frame(_ip(k, STACK_IP, _tcp(k, STACK_IP, 1024 + i, 8000, rng.getrandbits(32), 0,
                                    0x02, options=bytes([2, 4, 5, 0xB4]))))
    raw.close()
    good.sendall(b"after")                     # the connection survived all of it
    assert recv_exact(good, 5) == b"after"
    with socket.create_connection(server.addr, timeout=10) as fresh:
        fresh.sendall(b"fresh")                # and new ones are still accepted
        assert recv_exact(fresh, 5) == b"fresh"
    good.close()
    assert server.stop() == 0
    stats = _final_net_line(server.stderr)
    assert stats["dropped"] >= 1500, server.stderr[-1500:]
    assert "packet buffers in use 0" in server.stderr


# --- connections without file descriptors -------------------------------------------

def test_more_connections_than_a_process_may_hold_files(ustack):
    """A process may hold 20,000 open files here; the server holds 24,000
    connections on the user-space stack with a handful of descriptors (the
    kernel clients need two processes for theirs)."""
    net, start = ustack
    server = start("apps.echo:handle", "--stats")
    n = 24_000
    load = subprocess.Popen(
        [sys.executable, "-m", "qstack", "load", "--dest", f"{server.host}:{server.port}",
         "--allow-remote", "--ips", "1", "--src", KERNEL_IP,   # explicit source ports
         "-c", str(n), "--smp", "2", "-s", "4", "-w", "1", "-e", "1",
         "-b", "200", "-d", "3", "--drain", "5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_fds = 0
    try:
        while load.poll() is None:
            peak_fds = max(peak_fds, len(os.listdir(f"/proc/{server.proc.pid}/fd")))
            time.sleep(0.2)
        out, err = load.communicate(timeout=120)
    finally:
        if load.poll() is None:
            load.kill()
    assert load.returncode == 0, err[-2000:]
    assert server.stop() == 0
    held = [int(line.split("conns ")[1].split()[0]) for line in server.stdout.splitlines()
            if line.startswith("core 0")]
    assert max(held) == n, (held, out[-1500:])
    assert peak_fds < 100, peak_fds


# --- start-up errors -----------------------------------------------------------------------

def test_without_cap_net_admin_the_tap_error_says_so(tmp_path):
    """Root with CAP_NET_ADMIN dropped from its bounding set (rather than another
    user, who may not be able to read the checkout at all)."""
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv (util-linux) to drop a capability")
    run = subprocess.run(
        ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", sys.executable,
         "-m", "qstack", "serve", "apps.echo:handle", "--backend", "ustack",
         "--tap", "qsperm0", "--ip", STACK_IP + "/24"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "qstack: error: ustack: opening TAP device qsperm0 needs root (CAP_NET_ADMIN)"]


def test_dpdk_missing_from_the_build_is_one_plain_line(monkeypatch):
    from qstack import server
    from qstack.config import load_config
    from qstack.errors import ConfigError
    cfg = load_config(None, {"server.backend": "ustack", "ustack.driver": "dpdk",
                             "ustack.eal": "--no-huge", "ustack.ip": "198.18.0.2/24"})
    monkeypatch.setattr(server, "dpdk_library", lambda: None)
    with pytest.raises(ConfigError, match="DPDK is not available in this build"):
        server._ustack_settings(cfg)


# --- routing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("gateway", [True, False], ids=["gateway", "no-gateway"])
def test_a_client_off_the_subnet_is_reached_through_the_gateway(ustack, gateway):
    """A client at 198.18.1.1 (off the stack's /24): with --gateway the replies
    go to Linux's side of the link, which routes them; without one they have
    no route (dropped and counted), so the connection never opens."""
    net, start = ustack
    net.run("ip", "addr", "add", "198.18.1.1/32", "dev", "lo")
    args = ["--gateway", KERNEL_IP] if gateway else []
    server = start("apps.echo:handle", *args)
    s = socket.socket()
    s.bind(("198.18.1.1", 0))
    s.settimeout(3 if gateway else 1.5)
    try:
        if gateway:
            s.connect(server.addr)
            s.sendall(b"routed")
            assert recv_exact(s, 6) == b"routed"
        else:
            with pytest.raises(OSError):
                s.connect(server.addr)
    finally:
        s.close()


# --- one stack per core ----------------------------------------------------------------------

def test_two_cores_share_one_multi_queue_tap(serve):
    """--cores 2: each core process attaches a queue of one multi-queue TAP
    device and runs its own stack on the same address; the kernel steers
    each connection to one queue, so both cores serve some, and every
    connection is served whole by one of them."""
    net = TapNetns(multi_queue=True)
    try:
        with net.entered():
            server = serve("apps.echo:handle", "--cores", "2", "--stats", "--framing", "line",
                           ustack=["--tap", net.dev], net=net)
            socks = [socket.create_connection(server.addr, timeout=10) for _ in range(200)]
            for rnd in range(10):
                for i, s in enumerate(socks):
                    s.sendall(b"%d:%d\n" % (i, rnd))
                for i, s in enumerate(socks):
                    assert recv_exact(s, len(b"%d:%d\n" % (i, rnd))) == b"%d:%d\n" % (i, rnd)
            time.sleep(1.5)                      # a stats line with every connection up
            for s in socks:
                s.close()
            serve.stop_all()
    finally:
        net.close()
    held = {}
    for line in server.stdout.splitlines():
        if line.startswith("core "):
            core, conns = line.split()[1], int(line.split(" conns ")[1].split()[0])
            held[core] = max(held.get(core, 0), conns)
    assert set(held) == {"0", "1"} and all(held.values()), held
    assert sum(held.values()) == 200, held
    assert server.stderr.count("packet buffers in use 0") == 2, server.stderr[-2000:]


def test_several_cores_on_a_single_queue_tap_is_one_plain_line():
    net = TapNetns()                             # made without multi_queue
    try:
        with net.entered():
            run = subprocess.run(
                [sys.executable, "-m", "qstack", "serve", "apps.echo:handle", "--backend",
                 "ustack", "--tap", net.dev, "--ip", STACK_IP + "/24", "--cores", "2"],
                cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        net.close()
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"qstack: error: ustack: TAP device {net.dev} is not a multi-queue device, which "
        f"--cores 2 needs (ip tuntap add dev {net.dev} mode tap multi_queue)"]
