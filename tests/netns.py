"""A private network for a test: a namespace with a TAP device in it.

The kernel's side of the device is 198.18.0.1/24 (the benchmarking range);
qstack's user-space stack, attached to the device, answers as 198.18.0.2.
Nothing ever leaves the namespace.

``with net.entered():`` moves the calling thread into the namespace (setns
acts per thread), so processes it starts and sockets it opens live there;
leaving moves it back.  A test that serves on the user-space stack runs its
server and its kernel clients inside, exactly as on loopback elsewhere.
"""

import contextlib
import ctypes
import itertools
import os
import shutil
import subprocess
import time

KERNEL_IP, STACK_IP = "198.18.0.1", "198.18.0.2"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_seq = itertools.count()


def why_not():
    """Why this machine cannot run namespaced TAP tests, or None."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create a TAP device and a network namespace"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (no TUN/TAP support in this kernel or container)"
    if not shutil.which("ip"):
        return "the `ip` tool (iproute2) is not installed"
    return None


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


class TapNetns:
    """A namespace with a persistent TAP device whose kernel side is up.

    With create=False the device is left to the server: DPDK's net_tap
    creates its own (it cannot attach to a persistent one); bring_up()
    then gives it the kernel side's address once it exists."""

    def __init__(self, dev="qs0", create=True, multi_queue=False):
        k = next(_seq)
        self.name = f"qst-{os.getpid()}-{k}"
        self.dev = dev
        self.persistent = create
        try:
            self._sh("ip", "netns", "add", self.name)
            self.run("ip", "link", "set", "lo", "up")
            if create:
                self.run("ip", "tuntap", "add", "dev", dev, "mode", "tap",
                         *(["multi_queue"] if multi_queue else []))
                self.bring_up()
        except Exception:
            self.close()
            raise

    def bring_up(self, proc=None, timeout=60.0):
        """Address the kernel side (waiting for the device if a server makes it)."""
        deadline = time.monotonic() + timeout
        while self.run("ip", "link", "show", "dev", self.dev, check=False).returncode:
            if proc is not None and proc.poll() is not None:
                return                   # the server died: its caller reports why
            if time.monotonic() > deadline:
                raise RuntimeError(f"device {self.dev} never appeared")
            time.sleep(0.05)
        self.run("sysctl", "-qw", f"net.ipv6.conf.{self.dev}.disable_ipv6=1", check=False)
        self.run("ip", "addr", "add", KERNEL_IP + "/24", "dev", self.dev)
        self.run("ip", "link", "set", self.dev, "up")

    @staticmethod
    def _sh(*args, check=True):
        return subprocess.run(args, check=check, capture_output=True, timeout=20)

    def run(self, *args, check=True):
        """Run a command inside the namespace."""
        return self._sh("ip", "netns", "exec", self.name, *args, check=check)

    @contextlib.contextmanager
    def entered(self):
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(there)
            try:
                yield self
            finally:
                _setns(home)
        finally:
            os.close(there)
            os.close(home)

    def close(self):
        # the device first: a TAP device would outlive its namespace in the root one
        if self.persistent:
            self.run("ip", "tuntap", "del", "dev", self.dev, "mode", "tap", check=False)
        self._sh("ip", "netns", "del", self.name, check=False)


@contextlib.contextmanager
def entered_tap():
    """A TAP device in a namespace of our own, entered for the block and
    removed after it; yields the device's name (check why_not() first)."""
    net = TapNetns()
    try:
        with net.entered():
            yield net.dev
    finally:
        net.close()


class BridgedTaps:
    """A namespace with TAP devices on one bridge: a wire between the
    user-space stacks of several processes (`qstack serve --backend ustack`
    on one device, `qstack load --backend ustack` on another), with the
    kernel as a third host on the bridge (BRIDGE_IP/16) for checks.
    Nothing leaves the namespace; every name is qst-*."""

    BRIDGE_IP = "198.18.0.1"

    def __init__(self, devs=("qst-s", "qst-c")):
        self.name = f"qst-{os.getpid()}-{next(_seq)}"
        self.devs = list(devs)
        try:
            TapNetns._sh("ip", "netns", "add", self.name)
            self.run("ip", "link", "set", "lo", "up")
            self.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", check=False)
            self.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1", check=False)
            self.run("ip", "link", "add", "qst-br", "type", "bridge")
            for dev in self.devs:
                self.run("ip", "tuntap", "add", "dev", dev, "mode", "tap")
                self.run("ip", "link", "set", dev, "master", "qst-br")
                # a TAP device queues 1,000 frames for its reader by default: a
                # burst of thousands of SYNs or FINs would lose most of them
                self.run("ip", "link", "set", dev, "txqueuelen", "16384")
                self.run("ip", "link", "set", dev, "up")
            self.run("ip", "addr", "add", self.BRIDGE_IP + "/16", "dev", "qst-br")
            self.run("ip", "link", "set", "qst-br", "up")
        except Exception:
            self.close()
            raise

    _sh = staticmethod(TapNetns._sh)
    run = TapNetns.run
    entered = TapNetns.entered

    def close(self):
        for dev in self.devs:
            self.run("ip", "tuntap", "del", "dev", dev, "mode", "tap", check=False)
        self.run("ip", "link", "del", "qst-br", check=False)
        TapNetns._sh("ip", "netns", "del", self.name, check=False)
