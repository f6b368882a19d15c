"""CPU per message of the iotepserver handler, and of Redis client paths.

    .venv/bin/python bench/iotep_cpu.py [--messages 20000] [--app MODULE ...]
        [--paths] [--no-hiredis] [--repeat 5]

Starts one redis-server (``qstack redis up 1`` in a private directory),
runs ``init`` of the app, then calls its ``handle`` ``--messages`` times in
one greenlet under gevent (monkey-patched sockets, as in a core process),
over 1,000 device connections, one message in 20 a request, the greenlet's
``qstack_level`` set to the message's level as the hub sets it.  It prints
the process CPU time per message (user + system: this process only, not
redis-server's) and the wall time.  Redis waits are idle time, so the CPU
figure is what one message costs a core.

``--no-hiredis`` hides hiredis (redis-py then parses replies in Python).
``--app`` imports another module with the same ``init``/``handle`` (e.g. a
copy of an older iotepserver, to compare).  ``--paths`` also times one
GET/SET/GET per message through several client paths (redis-py's methods,
``execute_command``, its pipeline, the connection level, and hand-packed
RESP with hiredis's reader), to see where the time goes.

Take the machine's benchmark lock around it when CPUs are shared:
``flock /tmp/qstack-bench.lock .venv/bin/python bench/iotep_cpu.py``.
"""

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--no-hiredis" in sys.argv:      # before redis-py looks for it
    sys.modules["hiredis"] = None

from gevent import monkey  # noqa: E402

monkey.patch_socket()

from greenlet import getcurrent  # noqa: E402

from qstack import redisctl  # noqa: E402

CONNS = 1000
REQUEST_EVERY = 20


class FakeRequest:
    __slots__ = ("data", "priority", "conn_id")


def messages(n):
    out = []
    for i in range(n):
        req = FakeRequest()
        request = i % REQUEST_EVERY == 0
        req.data = memoryview(bytes([0x10, 1, 2, 3, 4, 1 if request else 0]) + bytes(194))
        req.priority = 0 if request else 1
        req.conn_id = i % CONNS
        out.append(req)
    return out


def cpu_per(fn, items):
    me = getcurrent()
    t0, c0 = time.perf_counter(), time.process_time()
    for it in items:
        me.qstack_level = it.priority
        fn(it)
    c1, t1 = time.process_time(), time.perf_counter()
    me.qstack_level = None
    return (c1 - c0) / len(items) * 1e6, (t1 - t0) / len(items) * 1e6


def interleaved(named, items, repeat):
    """Time each (name, fn) ``repeat`` times, rounds interleaved so that the
    machine's load changes hit every candidate alike; print min and median."""
    for _, fn in named:
        fn(items[0])                          # connect outside the timing
    runs = {name: [] for name, _ in named}
    for _ in range(repeat):
        for name, fn in named:
            runs[name].append(cpu_per(fn, items))
    for name, _ in named:
        cpu = sorted(c for c, _ in runs[name])
        wall = sorted(w for _, w in runs[name])
        print(f"  {name:36s} CPU/message min {cpu[0]:6.1f} us, median "
              f"{cpu[len(cpu) // 2]:6.1f} us; wall median {wall[len(wall) // 2]:6.1f} us")


def bench_apps(apps, sock_dir, items, repeat):
    named = []
    for app in apps:
        mod = importlib.import_module(app)
        mod.init({"redis_dir": sock_dir, "redis_count": 1})
        named.append((f"{app}.handle", mod.handle))
    interleaved(named, items, repeat)


def bench_paths(sock, items, repeat):
    import redis

    r = redis.Redis(unix_socket_path=sock, single_connection_client=True)
    conn = r.connection

    def methods(req):
        k = b"1\x08%d" % req.conn_id
        r.get(k)
        r.set(k, b"abcdef")
        r.get(b"2\x08%d" % req.conn_id)

    def execute(req):
        k = b"1\x08%d" % req.conn_id
        ex = r.execute_command
        ex("GET", k)
        ex("SET", k, b"abcdef")
        ex("GET", b"2\x08%d" % req.conn_id)

    def pipeline(req):
        k = b"1\x08%d" % req.conn_id
        p = r.pipeline(transaction=False)
        p.get(k)
        p.get(b"2\x08%d" % req.conn_id)
        p.execute()
        r.set(k, b"abcdef")

    def connection(req):
        k = b"1\x08%d" % req.conn_id
        conn.send_packed_command(conn.pack_commands(
            (("GET", k), ("GET", b"2\x08%d" % req.conn_id))), check_health=False)
        conn.read_response()
        conn.read_response()
        conn.send_packed_command(conn.pack_command("SET", k, b"abcdef"), check_health=False)
        conn.read_response()

    import socket as stdsocket
    s = stdsocket.socket(stdsocket.AF_UNIX)
    s.connect(sock)
    try:
        import hiredis
        reader = hiredis.Reader()
    except ImportError:
        reader = None

    def packed(req):
        cid = b"%d" % req.conn_id
        conn.send_packed_command([
            b"*2\r\n$3\r\nGET\r\n$%d\r\n1\x08%s\r\n*2\r\n$3\r\nGET\r\n$%d\r\n2\x08%s\r\n"
            % (len(cid) + 2, cid, len(cid) + 2, cid)], check_health=False)
        conn.read_response()
        conn.read_response()
        conn.send_packed_command([b"*3\r\n$3\r\nSET\r\n$%d\r\n1\x08%s\r\n$6\r\nabcdef\r\n"
                                  % (len(cid) + 2, cid)], check_health=False)
        conn.read_response()

    def rawpair(req):
        cid = b"%d" % req.conn_id
        s.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\n1\x08%s\r\n*2\r\n$3\r\nGET\r\n$%d\r\n2\x08%s\r\n"
                  % (len(cid) + 2, cid, len(cid) + 2, cid))
        got = 0
        while got < 2:
            reply = reader.gets()
            if reply is False:
                reader.feed(s.recv(65536))
            else:
                got += 1
        s.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n1\x08%s\r\n$6\r\nabcdef\r\n" % (len(cid) + 2, cid))
        while reader.gets() is False:
            reader.feed(s.recv(65536))

    print(f"redis-py {redis.__version__}, hiredis parser: "
          f"{redis.connection.HIREDIS_AVAILABLE}")
    interleaved((("methods get/set/get", methods), ("execute_command x3", execute),
                 ("pipeline(2 GET) + set", pipeline),
                 ("connection level, 2 round trips", connection),
                 ("connection level, packed by hand", packed),
                 *((("raw RESP + hiredis.Reader", rawpair),) if reader else ())),
                items, repeat)
    s.close()
    r.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--app", action="append", help="module (repeatable; default "
                    "apps.iotepserver)")
    ap.add_argument("--paths", action="store_true")
    ap.add_argument("--no-hiredis", action="store_true",
                    help="hide hiredis: redis-py parses replies in Python")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    directory = tempfile.mkdtemp(prefix="qsb-", dir="/tmp")
    items = messages(args.messages)
    try:
        redisctl.up(1, directory, out=lambda *a: None)
        bench_apps(args.app or ["apps.iotepserver"], directory, items, args.repeat)
        if args.paths:
            bench_paths(redisctl.socket_path(directory, 0), items, args.repeat)
    finally:
        redisctl.down(directory, out=lambda *a: None)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
