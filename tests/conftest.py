"""Real servers for the tests: `qstack serve` in a child process on 127.0.0.1."""

import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = os.path.join(ROOT, "qstack", "native")


@pytest.fixture(autouse=True)
def fresh_gevent_clock():
    """libev starts a timer from the time its loop last woke up. In the pytest
    process the hub may have slept through minutes of other tests, so a
    gevent timeout started now (``joinall(timeout=60)``) would expire at once."""
    if "gevent" in sys.modules:
        import gevent
        gevent.get_hub().loop.update_now()


def ensure_built(module, builder, src_dir, header):
    """Rebuild qstack.<module> in place if it is missing or older than its
    sources (unless QSTACK_NO_BUILD is set, e.g. for a sanitized build)."""
    import glob
    built = [os.path.getmtime(p) for p in glob.glob(os.path.join(ROOT, "qstack", module + "*.so"))]
    srcs = glob.glob(os.path.join(NATIVE, src_dir, "*")) + [
        os.path.join(NATIVE, "include", header), os.path.join(NATIVE, builder),
        os.path.join(NATIVE, "cffibuild.py")]
    stale = not built or any(os.path.getmtime(p) > max(built) for p in srcs)
    if stale and not os.environ.get("QSTACK_NO_BUILD"):
        subprocess.check_call([sys.executable, os.path.join(NATIVE, builder)], cwd=ROOT)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def tap_attached(pid, dev):
    """How many of process pid and its children (supervised cores) hold TAP
    device dev open (/proc/PID/fdinfo of a /dev/net/tun says which)."""
    n = 0
    for p in (pid, *_children(pid)):
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{p}/fd/{fd}") != "/dev/net/tun":
                    continue
                with open(f"/proc/{p}/fdinfo/{fd}") as f:
                    if f"iff:\t{dev}\n" in f.read():
                        n += 1
                        break
            except OSError:
                pass
    return n


def wait_tap(dev, proc, cores=1, timeout=15.0):
    """Wait (bounded) until the server's cores have opened its TAP device: a
    connect before that sends its ARP request into a device nobody reads,
    and Linux asks again only a second later (the first connect then times
    out); on a multi-queue device, a flow steered to the queue of a core
    not yet attached is lost."""
    deadline = time.monotonic() + timeout
    while tap_attached(proc.pid, dev) < cores:
        if proc.poll() is not None or time.monotonic() > deadline:
            return                       # wait_port says why
        time.sleep(0.01)


def wait_port(port, proc, timeout=15.0, host="127.0.0.1"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}: "
                               f"{proc.stderr.read().decode(errors='replace')}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port} within {timeout}s")


class Server:
    """A running `qstack serve`; stop() checks it exits 0 with no buffer leaked.

    On the kernel backend it listens on 127.0.0.1 and a free port; on the
    user-space stack (``ustack=`` the TAP device) at netns.STACK_IP, port 8000,
    from inside the namespace the caller entered."""

    def __init__(self, app, *args, env=None, cwd=ROOT, wrap=(), ustack=None, net=None):
        if ustack is None:
            self.host, self.port = "127.0.0.1", free_port()
            where = ["--host", self.host, "--port", str(self.port)]
        else:
            from netns import STACK_IP
            self.host, self.port = STACK_IP, 8000
            where = ["--port", str(self.port), "--backend", "ustack", *ustack,
                     "--ip", STACK_IP + "/24"]
        self.addr = (self.host, self.port)
        self.args = [*wrap, sys.executable, "-m", "qstack", "serve", app, *where, *args]
        # a stopping server's 0.25 s accept linger, shortened (qstack/server.py)
        env = {"QSTACK_TEST_ACCEPT_LINGER": "0.02", **(env or {})}
        self.proc = subprocess.Popen(self.args, cwd=cwd, env={**os.environ, **env},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stderr = ""
        self._early = {"stdout": b"", "stderr": b""}    # read by read_until()
        if net is not None and not net.persistent:
            net.bring_up(self.proc)      # the server made the device (DPDK net_tap)
        elif ustack is not None and "--tap" in ustack:
            cores = int(args[args.index("--cores") + 1]) if "--cores" in args else 1
            wait_tap(ustack[ustack.index("--tap") + 1], self.proc, cores)
        wait_port(self.port, self.proc, host=self.host)

    def connect(self, timeout=10.0):
        s = socket.create_connection(self.addr, timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def read_until(self, stream, pred, timeout=15.0):
        """Read the running server's "stdout" or "stderr" until pred(text so
        far) holds (bounded); returns the text.  stop() still returns all of
        it in .stdout and .stderr."""
        fd = (self.proc.stdout if stream == "stdout" else self.proc.stderr).fileno()
        deadline = time.monotonic() + timeout
        while True:
            text = self._early[stream].decode(errors="replace")
            if pred(text):
                return text
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"server {stream} not as expected within {timeout}s: "
                                     f"{text[-2000:]}")
            if select.select([fd], [], [], min(left, 0.1))[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"server closed its {stream}: {text[-2000:]}")
                self._early[stream] += chunk

    def stop(self, sig=signal.SIGTERM, timeout=20.0):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError("server did not stop in time")
        self.stdout = (self._early["stdout"] + out).decode(errors="replace")
        self.stderr = (self._early["stderr"] + err).decode(errors="replace")
        return self.proc.returncode


@pytest.fixture
def serve():
    """serve(app, *args) starts a server; at teardown it must stop cleanly:
    exit 0 on SIGTERM and every pool buffer back ("buffers in use 0").
    serve.stop_all() does that teardown early (before leaving a namespace)."""
    servers = []

    def start(app, *args, **kw):
        s = Server(app, *args, **kw)
        servers.append(s)
        return s

    def stop_all():
        while servers:
            s = servers.pop(0)
            already = s.proc.poll() is not None
            code = s.stop()
            if not already:
                assert code == 0, f"exit {code}: {s.stderr[-2000:]}"
                assert "buffers in use 0" in s.stderr, s.stderr[-2000:]
                if "ustack" in s.args:
                    assert "packet buffers in use 0" in s.stderr, s.stderr[-2000:]

    start.stop_all = stop_all
    yield start
    stop_all()


BACKENDS = [("kernel", "thread"), ("kernel", "inline"), ("uring", "thread"),
            ("uring", "inline"), ("ustack", "thread"), ("ustack", "inline"), ("dpdk", "thread")]
DPDK_EAL = "--no-huge -m 256 --no-pci --vdev=net_tap0,iface={iface}"


def dpdk_missing():
    """Why `--driver dpdk` cannot run here, or None."""
    from qstack.server import dpdk_library
    return None if dpdk_library() else "this build has no DPDK driver (no libdpdk found)"


@pytest.fixture(params=BACKENDS, ids=["-".join(p) for p in BACKENDS])
def serve_any(request, serve):
    """serve() on every backend and stack layout: kernel sockets on 127.0.0.1
    (epoll and io_uring), and the user-space stack on a TAP device (or
    DPDK's net_tap) in a namespace of the test's own (entered for the whole
    test: the server and the clients live there)."""
    backend, stack = request.param

    def start(app, *args, **kw):
        return serve(app, *args, "--stack", stack, **kw)

    if backend in ("kernel", "uring"):
        from qstack.transport import uring_refusal
        if backend == "uring" and uring_refusal():
            pytest.skip(uring_refusal())
        yield lambda app, *args, **kw: start(app, *args, "--backend", backend, **kw)
        return
    from netns import TapNetns, why_not
    if why_not() or (backend == "dpdk" and dpdk_missing()):
        pytest.skip(why_not() or dpdk_missing())
    net = TapNetns(create=backend == "ustack")
    flags = (["--tap", net.dev] if backend == "ustack" else
             ["--driver", "dpdk", "--eal", DPDK_EAL.format(iface=net.dev)])
    try:
        with net.entered():
            yield lambda app, *args, **kw: start(app, *args, ustack=flags, net=net, **kw)
            serve.stop_all()
    finally:
        net.close()


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_line(sock):
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError(f"connection closed after {bytes(buf)!r}")
        buf += chunk
    return bytes(buf)
