"""The user-space stack on DPDK (ustack/dpdk.c), against Linux's own TCP/IP.

EAL runs without hugepages or PCI (`--no-huge -m 256 --no-pci`) on DPDK's
net_tap PMD, which creates a kernel TAP device in the namespace of the
process that starts EAL.  So each test creates a network namespace and runs
the DPDK stack in a child process inside it (`ip netns exec`); the kernel
side, 198.18.0.1/24 on that device, runs there too.  No address outside
198.18.0.0/24 is used and nothing leaves the namespace.  Loss is injected by
the stack's own fault injector (the kernel has no netem).

The child is a small command loop (CHILD below): one JSON command per line
on stdin, one JSON answer per line on stdout marked with "@@" (EAL prints
what it likes).  One EAL per process is all DPDK allows, hence a process
per stack.  net_memif is tried the same way with two children.

Needs root, /dev/net/tun, `ip`, and qstack/_qsdpdk.so (built by
qstack/native/build_dpdk.py where libdpdk is installed); otherwise skips.
"""

import itertools
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ROOT, NATIVE
from qstack import memif
from netns import why_not
from test_ustack_tap import ECHO_CLIENT, ECHO_SERVER, KERNEL_IP, PING, STACK_IP, ip_of

LIB = os.path.join(ROOT, "qstack", "_qsdpdk.so")
EAL = "--no-huge -m 256 --no-pci --vdev=net_tap0,iface={iface}"
_seq = itertools.count()


def _ensure_dpdk_built():
    """Rebuild _qsdpdk.so when libdpdk is there and a source is newer."""
    if os.environ.get("QSTACK_NO_BUILD") or not shutil.which("pkg-config"):
        return
    if subprocess.run(["pkg-config", "--exists", "libdpdk"]).returncode:
        return
    srcs = [os.path.join(NATIVE, "ustack", f) for f in ("dpdk.c", "ustack.h", "tcp_seq.h")] + [
        os.path.join(NATIVE, "build_dpdk.py"), os.path.join(NATIVE, "include", "qsustack.h")]
    if not os.path.exists(LIB) or any(os.path.getmtime(p) > os.path.getmtime(LIB) for p in srcs):
        subprocess.check_call([sys.executable, os.path.join(NATIVE, "build_dpdk.py")], cwd=ROOT)


def _why_skip():
    if why_not():
        return why_not()
    _ensure_dpdk_built()
    if not os.path.exists(LIB):
        return ("qstack/_qsdpdk.so is not built: install libdpdk-dev and pkg-config, "
                "then run qstack/native/build_dpdk.py")
    return None


WHY = _why_skip()
pytestmark = pytest.mark.skipif(WHY is not None, reason=str(WHY))

# The command loop in the child: the harness of qsustack.h, one call per line.
CHILD = r"""
import json, sys, threading
from test_ustack_tcp import ffi, lib, config

def say(**kw):
    sys.stdout.write("@@ " + json.dumps(kw) + "\n")
    sys.stdout.flush()

lib_path, eal, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
err = ffi.new("int *")
x = lib.qsu_dpdk_open(lib_path.encode(), eal.encode(), config(1, **cfg), err)
if x == ffi.NULL:
    say(err=err[0], why=ffi.string(lib.qsu_dpdk_error()).decode())
    sys.exit(1)
mac = ffi.new("uint8_t[6]")
lib.qsu_tap_mac(x, mac)
say(err=0, mac=bytes(mac).hex(":"))
thread = None
for line in sys.stdin:
    c = json.loads(line)
    op = c.pop("op")
    if op == "echo":
        say(rc=lib.qsu_tap_echo(x, c["port"]))
    elif op == "fault":
        f = ffi.new("qs_fault_config *")
        for k, v in c.items():
            setattr(f, k, v)
        say(rc=lib.qsu_tap_fault(x, f))
    elif op == "serve":
        thread = threading.Thread(target=lib.qsu_tap_run, args=(x, c["ns"]), daemon=True)
        thread.start()
        say(rc=0)
    elif op == "stop":
        if thread:
            lib.qsu_tap_stop(x)
            thread.join(30)
            assert not thread.is_alive()
            thread = None
        say(rc=0)
    elif op == "stats":
        s = ffi.new("qs_ustack_stats *")
        lib.qsu_tap_stats(x, s)
        say(**{k: getattr(s, k) for k in dir(s)})
    elif op == "client":
        r = ffi.new("qsu_tap_client *")
        rc = lib.qsu_tap_client_run(x, c["ip"], c["port"], c["bytes"], c["seed"], c["ns"], r)
        i = r.info
        say(rc=rc, sent=r.sent, recvd=r.recvd, same=bytes(r.sha_sent) == bytes(r.sha_recv),
            secs=r.wall_ns / 1e9, state=i.state, flight=i.snd_max - i.snd_una,
            snd_wnd=i.snd_wnd, cwnd=i.cwnd, rto=i.rto_ms, nrexmit=i.nrexmit)
    elif op == "close":
        lib.qsu_tap_close(x)
        say(rc=0)
        break
"""

SEC = 1_000_000_000


class DpdkStack:
    """A stack on a DPDK port, in a child process in namespace `ns`."""

    def __init__(self, ns, eal, **cfg):
        self.buf = b""
        self.err = tempfile.TemporaryFile()     # EAL's log; a pipe could fill and block it
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", CHILD, LIB, eal, json.dumps(cfg)],
            cwd=os.path.join(ROOT, "tests"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.err, env={**os.environ, "PYTHONPATH": ROOT})
        r = self.answer(60)
        if r["err"]:
            self.kill()
            raise OSError(-r["err"], f"qsu_dpdk_open({eal!r}): {r['why']}\n{self.stderr()}")
        self.mac = r["mac"]

    def answer(self, timeout):
        """The next "@@" line; fails with the child's output if it takes too long."""
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if line.startswith(b"@@ "):
                    return json.loads(line[3:])
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise AssertionError(f"the DPDK child did not answer in {timeout} s:\n"
                                     f"{self.stderr()}")
            if select.select([fd], [], [], min(left, 1.0))[0]:
                b = os.read(fd, 65536)
                if not b:
                    self.p.wait(10)
                    raise AssertionError(f"the DPDK child exited {self.p.returncode}:\n"
                                         f"{self.stderr()}")
                self.buf += b

    def call(self, op, timeout=60, **kw):
        self.p.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.p.stdin.flush()
        return self.answer(timeout)

    def stderr(self):
        self.err.seek(0)
        return self.err.read().decode(errors="replace")[-4000:]

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)

    def close(self):
        """Close the port (and EAL) cleanly; kill the child if it does not."""
        try:
            if self.p.poll() is None:
                self.call("stop", timeout=40)
                self.call("close", timeout=20)
                self.p.stdin.close()
                self.p.wait(20)
        finally:
            self.kill()


class Namespace:
    def __init__(self):
        self.name = f"qsd-{os.getpid()}-{next(_seq)}"
        self.sh("ip", "netns", "add", self.name)
        self.nsh("ip", "link", "set", "lo", "up")
        # no IPv6 chatter (router solicitations) on the devices made here
        self.nsh("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1", check=False)
        self.nsh("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", check=False)

    @staticmethod
    def sh(*args, check=True):
        return subprocess.run(args, check=check, capture_output=True, timeout=20)

    def nsh(self, *args, check=True):
        return self.sh("ip", "netns", "exec", self.name, *args, check=check)

    def py(self, code, timeout=120):
        """Python inside the namespace; its stdout parsed as JSON."""
        r = subprocess.run(["ip", "netns", "exec", self.name, sys.executable, "-c", code],
                           capture_output=True, timeout=timeout)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        return json.loads(r.stdout)

    def close(self):
        self.sh("ip", "netns", "del", self.name, check=False)


class DpdkNet:
    """A namespace, a DPDK stack on net_tap in it as STACK_IP, Linux as KERNEL_IP."""

    def __init__(self, **cfg):
        self.ns = Namespace()
        self.iface = f"qsd{os.getpid() % 100000}t{next(_seq)}"[:15]
        self.stack = None
        try:
            self.stack = DpdkStack(self.ns.name, EAL.format(iface=self.iface),
                                   ip=ip_of(STACK_IP), **cfg)
            self.ns.nsh("ip", "addr", "add", KERNEL_IP + "/24", "dev", self.iface)
            self.ns.nsh("ip", "link", "set", self.iface, "up")
        except Exception:
            self.close()
            raise

    def close(self):
        try:
            if self.stack:
                self.stack.close()
        finally:
            self.ns.close()


@pytest.fixture
def dpdknet():
    n = DpdkNet()
    try:
        yield n
    finally:
        n.close()


def test_dpdk_linux_pings_the_stack(dpdknet):
    st = dpdknet.stack
    st.call("serve", ns=300 * SEC)
    assert dpdknet.ns.py(PING)["replies"] == 3
    st.call("stop")
    s = st.call("stats")
    assert s["icmp_echo_replies"] >= 3 and s["arp_tx"] >= 1
    # the stack answers with the port's MAC, not the config's 02:00:5e:10:00:02
    neigh = dpdknet.ns.nsh("ip", "neigh", "show", STACK_IP).stdout.decode()
    assert st.mac != "02:00:5e:10:00:02" and st.mac in neigh, (st.mac, neigh)


def test_dpdk_second_open_in_a_process_is_refused():
    """EAL runs once per process: a second port is -EBUSY, not a crash."""
    ns = Namespace()
    try:
        code = (
            "import json, sys\n"
            "from test_ustack_tcp import ffi, lib, config\n"
            f"lib_path, eal = {LIB!r}.encode(), {EAL.format(iface='qsdbusy')!r}.encode()\n"
            "err = ffi.new('int *')\n"
            "a = lib.qsu_dpdk_open(lib_path, eal, config(1), err)\n"
            "r = [err[0]]\n"
            "b = lib.qsu_dpdk_open(lib_path, eal, config(1), err)\n"
            "r += [err[0], b == ffi.NULL, ffi.string(lib.qsu_dpdk_error()).decode()]\n"
            "lib.qsu_tap_close(a)\n"
            "c = lib.qsu_dpdk_open(lib_path, eal, config(1), err)\n"
            "r += [err[0], c == ffi.NULL]\n"
            "missing = lib.qsu_dpdk_open(b'/nonexistent/_qsdpdk.so', eal, config(1), err)\n"
            "r += [err[0], ffi.string(lib.qsu_dpdk_error()).decode()]\n"
            "print(json.dumps(r))\n")
        r = subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-c", code],
                           cwd=os.path.join(ROOT, "tests"), capture_output=True, text=True,
                           timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
        assert r.returncode == 0, r.stderr
        first, second, null, why, third, null3, missing, why_missing = json.loads(r.stdout)
        assert first == 0
        assert (second, null) == (-16, True) and "already" in why       # -EBUSY
        assert (third, null3) == (-114, True)                             # -EALREADY
        assert missing == -95 and "not available" in why_missing          # -ENOTSUP
    finally:
        ns.close()


def test_dpdk_kernel_client_small_echo(dpdknet):
    st = dpdknet.stack
    assert st.call("echo", port=7)["rc"] == 0
    st.call("serve", ns=300 * SEC)
    r = dpdknet.ns.py(ECHO_CLIENT % (5, STACK_IP, 7))
    assert r == {"got": 5, "same": True, "secs": r["secs"]}


@pytest.mark.parametrize("size,loss", [(20_000_000, 0.0), (20_000_000, 0.01)])
def test_dpdk_kernel_client_echo(dpdknet, size, loss):
    st = dpdknet.stack
    assert st.call("echo", port=7)["rc"] == 0
    if loss:    # both ways, on our side of the wire
        assert st.call("fault", loss=loss, seed=99, rx=1)["rc"] == 0
    st.call("serve", ns=300 * SEC)
    r = dpdknet.ns.py(ECHO_CLIENT % (size, STACK_IP, 7), timeout=240)
    assert r["got"] == size and r["same"], r
    st.call("stop")
    s = st.call("stats")
    if loss:
        assert s["tcp_rexmit"] > 0
    assert s["pool_in_use"] < s["pool_total"]
    print(f"\n{size / 1e6:.0f} MB echoed through ustack on DPDK net_tap, "
          f"{loss:.0%} loss: {r['secs']:.2f} s, drv_drop {s['drv_drop']}")


@pytest.mark.parametrize("size,loss", [(5_000_000, 0.0), (20_000_000, 0.01)])
def test_dpdk_stack_client_to_kernel_server(dpdknet, size, loss):
    st = dpdknet.stack
    if loss:
        assert st.call("fault", loss=loss, seed=5, rx=1)["rc"] == 0
    p = subprocess.Popen(["ip", "netns", "exec", dpdknet.ns.name, sys.executable, "-c",
                          ECHO_SERVER % (KERNEL_IP, 9000)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        assert json.loads(p.stdout.readline()) == "listening"
        r = st.call("client", timeout=200, ip=ip_of(KERNEL_IP), port=9000, bytes=size, seed=3,
                    ns=180 * SEC)
        assert r["rc"] == 0 and r["sent"] == r["recvd"] == size and r["same"], r
        assert json.loads(p.stdout.readline()) == size
        print(f"\nustack client on DPDK net_tap, {size / 1e6:.0f} MB echoed by Linux, "
              f"{loss:.0%} loss: {r['secs']:.2f} s")
    finally:
        p.kill()
        p.wait()


MEMIF = "--no-huge -m 256 --no-pci --vdev=net_memif0,role={role},id=0,socket-abstract=no,socket={sock}"


def test_dpdk_memif_two_stacks_echo(tmp_path):
    """Two DPDK processes joined by net_memif (shared memory, no kernel
    network at all): a stack on each, the client's bytes echoed back."""
    ns = Namespace()
    sock = str(tmp_path / "memif.sock")
    server = client = None
    try:
        server = DpdkStack(ns.name, MEMIF.format(role="server", sock=sock), ip=ip_of(KERNEL_IP),
                           mac=list(bytes.fromhex("02005e100001")), sack=1)
        assert server.call("echo", port=7)["rc"] == 0
        server.call("serve", ns=300 * SEC)
        client = DpdkStack(ns.name, MEMIF.format(role="client", sock=sock), ip=ip_of(STACK_IP),
                           sack=1)
        assert client.mac != server.mac
        r = None
        for attempt in range(20):       # the memif link comes up a little after start
            r = client.call("client", timeout=60, ip=ip_of(KERNEL_IP), port=7, bytes=20_000_000,
                            seed=11, ns=30 * SEC)
            if r["rc"] != -110 or r["sent"]:    # -ETIMEDOUT before the link came up
                break
        assert r["rc"] == 0 and r["sent"] == r["recvd"] == 20_000_000 and r["same"], r
        server.call("stop")
        s = server.call("stats")        # it was the other stack that echoed, over memif
        assert s["tcp_passive_opens"] >= 1 and s["rx_bytes"] > 20_000_000, s
        print(f"\n20 MB echoed between two ustacks over DPDK net_memif: {r['secs']:.2f} s")
    finally:
        for s in (client, server):
            if s:
                s.close()
        ns.close()


def test_qstack_serve_on_memif(tmp_path):
    """`qstack serve --driver memif`: the EAL arguments made from a socket
    path, a stale socket left by a killed server removed, a live one
    refused, and a ustack client in another process (DPDK's memif client
    role) echoed 20 MB through the whole server over shared memory.  The
    client starts first: its port waits for the server to come up."""
    sock = str(tmp_path / "qs.memif")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(sock)                    # as a killed server leaves it: bound, nobody listening
    stale.close()
    serve = [sys.executable, "-m", "qstack", "serve", "apps.echo:handle", "--backend", "ustack",
             "--driver", "memif", "--memif", sock, "--ip", KERNEL_IP + "/24", "--port", "7"]
    p = subprocess.Popen(["sh", "-c", 'sleep 2; exec "$@"', "sh"] + serve, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ns = Namespace()
    client = None
    try:
        client = DpdkStack(ns.name, MEMIF.format(role="client", sock=sock), ip=ip_of(STACK_IP),
                           sack=1)
        assert p.poll() is None, p.stderr.read().decode(errors="replace")
        deadline = time.monotonic() + 60
        while not (os.path.exists(sock) and stat.S_ISSOCK(os.stat(sock).st_mode)
                   and memif.listening(sock)):
            assert p.poll() is None, p.stderr.read().decode(errors="replace")
            assert time.monotonic() < deadline, "the memif server socket never appeared"
            time.sleep(0.1)
        second = subprocess.run(serve, cwd=ROOT, capture_output=True, timeout=60)
        assert second.returncode == 2 and second.stderr.decode().strip().endswith(
            f"ustack.memif: another memif server is listening on {sock}"), second.stderr
        r = None
        for attempt in range(20):       # the memif link comes up a little after start
            r = client.call("client", timeout=60, ip=ip_of(KERNEL_IP), port=7, bytes=20_000_000,
                            seed=12, ns=30 * SEC)
            if r["rc"] != -110 or r["sent"]:
                break
        # "sent" counts what the send queue took, not what left: a link that
        # never came up shows as every frame a driver drop in the stats
        assert r["rc"] == 0 and r["sent"] == r["recvd"] == 20_000_000 and r["same"], (
            r, {k: v for k, v in client.call("stats").items() if v}, client.stderr())
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
        err = err.decode(errors="replace")
        assert p.returncode == 0, err
        assert "on ustack/memif" in err and "buffers in use 0" in err, err
        assert not os.path.exists(sock)  # the server removes its socket
        print(f"\n20 MB echoed by qstack serve over memif: {r['secs']:.2f} s")
    finally:
        if client:
            client.close()
        if p.poll() is None:
            p.kill()
            p.wait(10)
        ns.close()


def test_dpdk_qstack_serve_echo():
    """The whole server on this driver: `qstack serve --backend ustack
    --driver dpdk` in a namespace, a Linux client echoed through it."""
    ns = Namespace()
    iface = f"qsd{os.getpid() % 100000}s{next(_seq)}"[:15]
    p = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, sys.executable, "-m", "qstack", "serve",
         "apps.echo:handle", "--backend", "ustack", "--driver", "dpdk",
         "--eal", EAL.format(iface=iface), "--ip", STACK_IP + "/24", "--port", "7"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while ns.nsh("ip", "link", "show", "dev", iface, check=False).returncode:
            assert p.poll() is None, p.stderr.read().decode(errors="replace")
            assert time.monotonic() < deadline, "net_tap never created its device"
            time.sleep(0.1)
        ns.nsh("ip", "addr", "add", KERNEL_IP + "/24", "dev", iface)
        ns.nsh("ip", "link", "set", iface, "up")
        r = ns.py(ECHO_CLIENT % (5_000_000, STACK_IP, 7), timeout=120)
        assert r["got"] == 5_000_000 and r["same"], r
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
        err = err.decode(errors="replace")
        assert p.returncode == 0, err
        assert "on ustack/dpdk" in err and "buffers in use 0" in err, err
        assert "packet buffers in use 0" in err, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        ns.close()
