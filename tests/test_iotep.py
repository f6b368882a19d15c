"""iotepserver on real redis-servers, and `qstack redis up|down|status`.

Every test that needs Redis starts its own servers with `qstack redis up` in
a fresh directory and stops them at teardown (`qstack redis down`, then a
SIGKILL of whatever pid file is left), so no redis-server outlives a test,
even a failing one.  Servers run through the `serve` fixture, which checks
exit 0 and "buffers in use 0" when they stop; the app's main cases also run
on the user-space stack (`serve_any`: a TAP device in a namespace, Linux's
TCP as the client).  Every wait is bounded.
"""

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import yaml

from conftest import ROOT, recv_exact

redis = pytest.importorskip("redis")

needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="needs redis-server (make test installs it)")

MSG = 200
# The reply QStack's iotepserver sent, written out independently of the app.
REPLY = (b"HTTP/1\x031 200 OK\r\n"
         b"Date: 25.11.1985\r\n"
         b"Server: Webserver on Middlebox TCP (Ubuntu)\r\n"
         b"Content-Length: 100\r\n"
         b"Connection: keep-alive\r\n\r\n").ljust(146, b"\0")
assert len(REPLY) == 146


def message(request, first=0x10, size=MSG):
    """A device message: byte 5 is 0x01 for a request, 0x00 for a heartbeat."""
    head = bytes([first, 0xA1, 0xA2, 0xA3, 0xA4, 0x01 if request else 0x00])
    return head + bytes(range(6, size)) if size <= 256 else head + b"x" * (size - 6)


def qstack(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "qstack", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


class Redises:
    """`qstack redis up` in a private directory; kill() at teardown."""

    def __init__(self):
        # Short path: a unix socket path must stay under 108 bytes.
        self.dir = tempfile.mkdtemp(prefix="qsr-", dir="/tmp")
        self.count = 0

    def up(self, count, *extra):
        res = qstack("redis", "up", str(count), "--dir", self.dir, *extra)
        assert res.returncode == 0, res.stderr
        self.count = count
        return res

    def sock(self, i):
        return os.path.join(self.dir, f"redis-{i}.sock")

    def pid(self, i):
        with open(os.path.join(self.dir, f"redis-{i}.pid")) as f:
            return int(f.read())

    def client(self, i):
        return redis.Redis(unix_socket_path=self.sock(i), socket_timeout=10)

    def config(self, tmp_path, count=None, **settings):
        """conf/iotepserver.yaml pointed at these servers (plus overrides)."""
        with open(os.path.join(ROOT, "conf", "iotepserver.yaml")) as f:
            cfg = yaml.safe_load(f)
        cfg["app"]["settings"].update(redis_dir=self.dir,
                                      redis_count=count or self.count, **settings)
        cfg["server"]["stats_interval"] = 0.2
        # one core: the tests follow one core's workers and Redis connections
        # (and TAP/DPDK serve one queue); test_redis_not_reachable... sets --cores
        cfg["server"]["cores"] = 1
        path = tmp_path / "iotep.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    def keys(self, i, pattern=b"*"):
        return {k: self.client(i).get(k) for k in self.client(i).keys(pattern)}

    def kill(self):
        try:
            qstack("redis", "down", "--dir", self.dir, timeout=20)
        finally:
            for name in os.listdir(self.dir):      # whatever down could not stop
                if name.endswith(".pid"):
                    try:
                        with open(os.path.join(self.dir, name)) as f:
                            os.kill(int(f.read()), signal.SIGKILL)
                    except (OSError, ValueError):
                        pass
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def redises():
    r = Redises()
    try:
        yield r
    finally:
        r.kill()


def wait_for(check, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def nothing_arrives(sock, wait=0.4):
    ready, _, _ = select.select([sock], [], [], wait)
    return not ready


def one_key(redises, server=0):
    keys = redises.keys(server, b"1\x08*")
    return next(iter(keys.items())) if len(keys) == 1 else None


# --- the app ---------------------------------------------------------------------

@needs_redis
def test_keys_and_byte_exact_replies_for_both_kinds(redises, serve_any, tmp_path):
    serve = serve_any                   # both backends, both stack layouts
    redises.up(1)
    # One worker: messages are handled one after the other, so every update
    # of the key is seen by the next (with several, two messages of one
    # connection may read the same old value: QStack's workers raced too).
    server = serve("apps.iotepserver:handle", "--config", redises.config(tmp_path),
                   "--workers", "1")
    with server.connect() as s:
        s.sendall(message(request=False, first=0x10))       # heartbeat: SET first bytes
        key, value = wait_for(lambda: one_key(redises), what="the heartbeat's key")
        assert key.startswith(b"1\x08") and key[2:].isdigit()
        assert value == bytes([0x10, 0xA1, 0xA2, 0xA3, 0xA4, 0x00])
        # and no reply: replies come in arrival order, so one to this heartbeat
        # would be read in place of the request's below (or be left over for
        # the check at the end)

        s.sendall(message(request=True, first=0x77))         # request: first byte + 1
        assert recv_exact(s, 146) == REPLY
        assert redises.client(0).get(key) == bytes([0x11, 0xA1, 0xA2, 0xA3, 0xA4, 0x00])

        for _ in range(3):
            s.sendall(message(request=False))
        s.sendall(message(request=True))
        assert recv_exact(s, 146) == REPLY                   # one reply for four messages
        # (the request may overtake the heartbeats: it has the higher priority)
        wait_for(lambda: redises.client(0).get(key) ==
                 bytes([0x15, 0xA1, 0xA2, 0xA3, 0xA4, 0x00]), what="four updates")
        assert nothing_arrives(s)                            # no reply to any heartbeat
        assert redises.keys(0, b"2\x08*") == {}               # key 2 is only read

    with server.connect() as s2:                            # another connection, own key
        s2.sendall(message(request=True, first=0x42))
        assert recv_exact(s2, 146) == REPLY
        keys = redises.keys(0, b"1\x08*")
        assert len(keys) == 2 and keys.pop(key)[0] == 0x15
        assert list(keys.values()) == [bytes([0x42, 0xA1, 0xA2, 0xA3, 0xA4, 0x01])]


@needs_redis
def test_heartbeats_update_redis_without_replies(redises, serve, tmp_path):
    redises.up(1)
    server = serve("apps.iotepserver:handle", "--config", redises.config(tmp_path),
                   "--workers", "1")
    with server.connect() as s:
        s.sendall(b"".join(message(request=False, first=0x30) for _ in range(20)))
        wait_for(lambda: (one_key(redises) or (0, b"\0"))[1][:1] == bytes([0x30 + 19]),
                 what="20 heartbeats applied")
        assert nothing_arrives(s, 0.5)
    assert server.stop() == 0
    assert "redis_errors" not in server.stderr


@needs_redis
def test_same_commands_as_qstack_two_round_trips_per_message(redises, serve, tmp_path):
    # GET 1 and GET 2 are pipelined, then the SET: still exactly QStack's
    # three commands per message, key 2 only read, on connections kept per
    # level (at most workers x levels of them, each made once and reused).
    # One worker: no two messages race on the key, every update counts.
    redises.up(1)
    admin = redises.client(0)
    server = serve("apps.iotepserver:handle", "--config", redises.config(tmp_path),
                   "--workers", "1")
    admin.config_resetstat()
    with server.connect() as s:
        for i in range(10):
            s.sendall(message(request=i % 2 == 0, first=0x20))
        for _ in range(5):
            assert recv_exact(s, 146) == REPLY
        wait_for(lambda: admin.info("commandstats").get("cmdstat_set", {}).get("calls") == 10,
                 what="ten SETs")
    stats = admin.info("commandstats")
    assert stats["cmdstat_get"]["calls"] == 20
    ours = {name for name in stats if not name.startswith(("cmdstat_config", "cmdstat_info"))}
    assert ours == {"cmdstat_get", "cmdstat_set"}        # nothing else, not even HELLO
    key, value = one_key(redises)
    assert value[0] == 0x20 + 9 and value[1:5] == bytes([0xA1, 0xA2, 0xA3, 0xA4])
    assert redises.keys(0, b"2\x08*") == {}
    clients = [c for c in admin.client_list() if c["cmd"] != "client|list"]
    assert 1 <= len(clients) <= 1 * 2, clients
    assert server.stop() == 0
    assert "hiredis parser" in server.stderr        # installed with qstack


@needs_redis
def test_priority_off_still_replies_to_requests_only(redises, serve_any, tmp_path):
    serve = serve_any                   # both backends, both stack layouts
    redises.up(1)
    server = serve("apps.iotepserver:handle", "--config", redises.config(tmp_path),
                   "--levels", "1")
    with server.connect() as s:
        s.sendall(message(request=False) + message(request=True) + message(request=False))
        assert recv_exact(s, 146) == REPLY
        assert nothing_arrives(s)


@needs_redis
def test_slow_redis_blocks_only_the_workers_that_use_it(redises, serve, tmp_path):
    # Worker i uses server i mod 2.  Server 0 sleeps 3 s: the (at most two of
    # four) workers waiting on it are suspended, the others keep serving.
    redises.up(2, "--debug")
    server = serve("apps.iotepserver:handle", "--config", redises.config(tmp_path),
                   "--workers", "4")
    sleeper = threading.Thread(
        target=lambda: redises.client(0).execute_command("DEBUG", "SLEEP", "3"),
        daemon=True)
    sleeper.start()
    time.sleep(0.2)
    conns = [server.connect() for _ in range(12)]
    t0 = time.monotonic()
    for c in conns:
        c.sendall(message(request=True))
    replied = set()
    while time.monotonic() - t0 < 1.5 and len(replied) < len(conns):
        ready, _, _ = select.select([c for c in conns if c not in replied], [], [], 0.05)
        for c in ready:
            assert recv_exact(c, 146) == REPLY
            replied.add(c)
    assert sleeper.is_alive(), "DEBUG SLEEP ended early: the check proves nothing"
    assert len(replied) >= 8, f"only {len(replied)} of 12 served while redis-0 slept"
    for c in conns:                                  # the rest once it wakes up
        if c not in replied:
            c.settimeout(10)
            assert recv_exact(c, 146) == REPLY
        c.close()
    sleeper.join(10)
    assert server.stop() == 0
    assert "redis_errors" not in server.stderr


# --- faults ----------------------------------------------------------------------

@needs_redis
@pytest.mark.parametrize("cores", ["1", "2"])
def test_redis_not_reachable_at_start_is_one_line_exit_2(redises, tmp_path, cores):
    conf = redises.config(tmp_path, count=2)
    res = qstack("serve", "--config", conf, "--port", "0", "--cores", cores)
    assert res.returncode == 2, res
    assert res.stderr.strip().splitlines() == [f"qstack: error: redis not reachable at {redises.sock(0)}: "
                      f"No such file or directory (start the servers with: "
                      f"qstack redis up 2 --dir {redises.dir})"], res.stderr
    assert "Traceback" not in res.stderr


@needs_redis
def test_stale_socket_and_bad_settings_are_start_up_errors(redises, tmp_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(redises.sock(0))               # a socket file nobody listens on
    stale.close()
    res = qstack("serve", "--config", redises.config(tmp_path, count=1), "--port", "0")
    assert res.returncode == 2
    assert res.stderr.strip().endswith(
        f"redis not reachable at {redises.sock(0)}: Connection refused "
        f"(start the servers with: qstack redis up 1 --dir {redises.dir})")
    res = qstack("serve", "--config", redises.config(tmp_path, count=1, redis_cont=3),
                 "--port", "0")
    assert res.returncode == 2
    assert "unknown setting 'app.settings.redis_cont' for iotepserver" in res.stderr


@needs_redis
def test_redis_dying_while_serving_costs_replies_not_connections(redises, serve, tmp_path):
    redises.up(2)
    server = serve("apps.iotepserver:handle", "--config", redises.config(tmp_path),
                   "--workers", "4", "--stats")
    s = server.connect()
    s.sendall(message(request=True))
    assert recv_exact(s, 146) == REPLY

    # redis-1 dies: messages that reach its workers get nothing, the rest
    # are served as usual.
    os.kill(redises.pid(1), signal.SIGKILL)
    conns = [server.connect() for _ in range(20)]
    for c in conns:
        c.sendall(message(request=True))
    time.sleep(1.0)
    served = [c for c in conns if not nothing_arrives(c, 0.01)]
    # Its two workers rest after each error, so they take only a few messages.
    assert len(served) >= 12, f"only {len(served)} of 20 served with redis-0 alive"
    for c in served:
        assert recv_exact(c, 146) == REPLY

    # Both die: nothing is answered, nothing is lost silently (counted).
    assert qstack("redis", "down", "--dir", redises.dir).returncode == 0
    for c in conns[:10]:
        c.sendall(message(request=True) + message(request=False))
    time.sleep(0.5)
    assert all(nothing_arrives(c, 0.01) for c in conns[:10])
    with server.connect() as fresh:               # still accepting
        fresh.sendall(message(request=True))
        assert nothing_arrives(fresh, 0.3)

    # Redis comes back: served again, no restart of qstack.
    redises.up(2)
    for c in (s, *conns[:5]):
        for _ in range(3):
            c.sendall(message(request=True))
            assert recv_exact(c, 146) == REPLY
    for c in (s, *conns):
        c.close()

    assert server.stop() == 0
    err = server.stderr
    failed = err.count("failed: ")
    assert 1 <= failed <= 2, err[-3000:]            # once per server and burst
    assert "answers again after" in err
    assert "handler raised" not in err
    line = next(ln for ln in err.splitlines() if "counters: redis_errors" in ln)
    l0, l1 = (int(x) for x in line.split("redis_errors L0 ")[1].split(" L1 "))
    assert l0 >= 11 and l1 >= 10, line               # 10 + 1 requests, 10 heartbeats
    assert "redis_errors L0" in server.stdout        # and in the --stats lines


# --- qstack redis ------------------------------------------------------------------

@needs_redis
def test_redis_up_status_down(redises):
    res = redises.up(2)
    assert f"started 2 redis-server(s) in {redises.dir}" in res.stdout
    for i in range(2):
        assert redises.client(i).ping()
        assert oct(os.stat(redises.sock(i)).st_mode & 0o777) == "0o700"
    res = qstack("redis", "status", "--dir", redises.dir)
    assert res.returncode == 0
    assert f"{redises.sock(1)}  pid {redises.pid(1)}  answers PING" in res.stdout
    assert "2 of 2 answer PING" in res.stdout
    # no TCP port: the servers listen on their unix sockets only
    assert redises.client(0).config_get("port") == {"port": "0"}

    res = qstack("redis", "up", "2", "--dir", redises.dir)
    assert res.returncode == 0, res.stderr
    assert f"redis-0.sock already running (pid {redises.pid(0)})" in res.stdout
    assert f"all 2 redis-server(s) in {redises.dir} were already running" in res.stdout

    os.kill(redises.pid(1), signal.SIGKILL)
    wait_for(lambda: qstack("redis", "status", "--dir", redises.dir).returncode == 1,
             what="status to see redis-1 gone")
    res = qstack("redis", "down", "--dir", redises.dir)
    assert res.returncode == 0
    assert f"stopped 1 redis-server(s) in {redises.dir}" in res.stdout
    assert not [n for n in os.listdir(redises.dir) if not n.endswith(".log")]
    res = qstack("redis", "down", "--dir", redises.dir)
    assert res.returncode == 0 and "no redis-server running" in res.stdout
    assert qstack("redis", "status", "--dir", redises.dir).returncode == 1


@needs_redis
def test_redis_up_restarts_only_the_dead_server(redises):
    redises.up(3)
    redises.client(0).set(b"keep", b"me")
    pids = [redises.pid(i) for i in range(3)]
    os.kill(pids[1], signal.SIGKILL)
    wait_for(lambda: qstack("redis", "status", "--dir", redises.dir).returncode == 1,
             what="status to see redis-1 gone")
    res = qstack("redis", "up", "3", "--dir", redises.dir)
    assert res.returncode == 0, res.stderr
    assert f"redis-0.sock already running (pid {pids[0]})" in res.stdout
    assert f"redis-2.sock already running (pid {pids[2]})" in res.stdout
    assert f"started 1 redis-server(s) in {redises.dir}: redis-1.sock" in res.stdout
    assert redises.pid(0) == pids[0] and redises.pid(2) == pids[2]
    assert redises.pid(1) != pids[1] and redises.client(1).ping()
    assert redises.client(0).get(b"keep") == b"me"      # the healthy ones kept their data
    # more servers than before: the new ones start, the old ones are reported
    res = qstack("redis", "up", "4", "--dir", redises.dir)
    assert res.returncode == 0, res.stderr
    assert f"started 1 redis-server(s) in {redises.dir}: redis-3.sock" in res.stdout
    redises.count = 4


@needs_redis
def test_redis_up_refuses_a_socket_that_is_not_its_own(redises):
    os.makedirs(redises.dir, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(redises.sock(0))
        other.listen(1)
        res = qstack("redis", "up", "1", "--dir", redises.dir)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"qstack: error: socket {redises.sock(0)} is already taken by a running server "
        f"(stop it with: qstack redis down --dir {redises.dir})")


def test_redis_up_without_redis_server_installed(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}
    res = qstack("redis", "up", "1", "--dir", str(tmp_path / "r"), env=env)
    assert res.returncode == 2
    assert res.stderr.strip() == ("qstack: error: redis-server is not installed "
                                  "(apt-get install redis-server, or put it on PATH)")


def test_redis_server_that_fails_to_start(tmp_path):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho '*** FATAL CONFIG FILE ERROR ***' >&2\n"
                    "echo 'Bad directive or wrong number of arguments' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    directory = tempfile.mkdtemp(prefix="qsr-", dir="/tmp")
    try:
        res = qstack("redis", "up", "2", "--dir", directory, env=env)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert res.returncode == 2
    assert res.stderr.strip() == ("qstack: error: redis-server 0 failed to start: "
                                  "Bad directive or wrong number of arguments")


def test_redis_socket_path_too_long():
    res = qstack("redis", "up", "1", "--dir", "/tmp/" + "d" * 100)
    assert res.returncode == 2
    assert "too long for a unix socket" in res.stderr and "shorter --dir" in res.stderr
    assert not os.path.exists("/tmp/" + "d" * 100)


# --- app counters in the stats ---------------------------------------------------

def test_app_counters_api():
    from qstack.app import counters
    import qstack
    counters.reset()
    try:
        assert counters.snapshot() == {}
        qstack.count("redis_errors", 1)
        qstack.count("redis_errors", 0, 3)
        qstack.count("misses")
        assert counters.snapshot() == {"redis_errors": [3, 1], "misses": [1]}
        with pytest.raises(ValueError):
            qstack.count("redis_errors", -1)
    finally:
        counters.reset()


def test_stats_lines_show_app_counters_per_level_and_summed():
    from qstack.stats import StatsView

    def snap(core, counters=None):
        s = {"core": core, "t": 1.0, "conns": 1, "accepted": 1, "bufs_in_use": 0,
             "bufs_total": 16, "cpu_stack": 0.0, "cpu_hub": 0.0,
             "levels": [{"requests": 0, "bytes_in": 0, "bytes_out": 0, "replies": 0,
                         "queued": 0, "lat": [0] * 328} for _ in range(2)]}
        if counters is not None:
            s["counters"] = counters
        return s

    lines = StatsView().update([snap(0, {"redis_errors": [2, 5], "quiet": [0]}),
                                snap(1, {"redis_errors": [0, 1]}), snap(2)])
    assert lines[0].endswith("  redis_errors L0 2 L1 5")
    assert lines[1].endswith("  redis_errors L0 0 L1 1")
    assert "redis_errors" not in lines[2] and "quiet" not in "".join(lines)
    assert lines[3].startswith("total") and lines[3].endswith("  redis_errors L0 2 L1 6")
