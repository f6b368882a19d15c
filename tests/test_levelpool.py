"""qstack.LevelPool with redis-py against a real redis-server.

The server is started in a private directory by qstack.redisctl (as
`qstack redis up`) and stopped at teardown, SIGKILL for whatever is left.
The hub sets ``qstack_level`` on the worker greenlet that runs a request;
here greenlets set it themselves (``at_level``), as the hub does, so the
pool is tested in-process.  Clients use gevent's sockets through their
connection class, so many greenlets wait on Redis at once without
monkey-patching the test process.  The last test goes through a real
server (it checks per-level connections only where the hub sets levels).
"""

import os
import shutil
import signal
import socket as stdsocket
import tempfile

import gevent
import pytest
from gevent import socket as gsocket
from greenlet import getcurrent

import qstack
from conftest import recv_line

redis = pytest.importorskip("redis")

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="needs redis-server (make test installs it)")


class GeventUnixConnection(redis.UnixDomainSocketConnection):
    """redis-py's unix-socket connection on a gevent socket (no monkey patching)."""

    def _connect(self):
        sock = gsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        sock.settimeout(self.socket_timeout)
        sock.connect(self.path)
        return sock


@pytest.fixture
def redis_sock():
    from qstack import redisctl
    directory = tempfile.mkdtemp(prefix="qsl-", dir="/tmp")
    try:
        redisctl.up(1, directory, debug=True, out=lambda *a: None)
        yield redisctl.socket_path(directory, 0)
    finally:
        try:
            redisctl.down(directory, out=lambda *a: None)
        finally:
            for name in os.listdir(directory):
                if name.endswith(".pid"):
                    try:
                        with open(os.path.join(directory, name)) as f:
                            os.kill(int(f.read()), signal.SIGKILL)
                    except (OSError, ValueError):
                        pass
            shutil.rmtree(directory, ignore_errors=True)


def client_factory(path, made, **kw):
    """A factory of redis.Redis clients named after the level they serve."""
    def factory():
        level = qstack.current_level()
        made.append(level)
        pool = redis.ConnectionPool(connection_class=GeventUnixConnection, path=path,
                                    socket_timeout=10, client_name=f"level-{level}")
        return redis.Redis(connection_pool=pool, **kw)
    return factory


def close_client(r):
    """LevelPool's close: a client made on a pool of ours does not close it."""
    r.close()
    r.connection_pool.disconnect()


def level_pool(path, made, single=False, **kw):
    return qstack.LevelPool(client_factory(path, made, single_connection_client=single),
                            close=close_client, **kw)


def at_level(level, fn, *args):
    """Run fn as the hub runs a handler: with the request's level on the greenlet."""
    me = getcurrent()
    me.qstack_level = level
    try:
        return fn(*args)
    finally:
        del me.qstack_level


def names_connected(path):
    admin = redis.Redis(unix_socket_path=path, socket_timeout=10)
    try:
        return sorted(c["name"] for c in admin.client_list() if c["name"])
    finally:
        admin.close()


def test_get_gives_each_level_its_own_connection_reused_within_the_level(redis_sock):
    made = []
    pool = level_pool(redis_sock, made)
    ids = {}
    for level in (0, 1, 0, 1, 2):
        ids.setdefault(level, set()).add(
            at_level(level, lambda: pool.get().client_id()))
    assert {level: len(v) for level, v in ids.items()} == {0: 1, 1: 1, 2: 1}
    assert len(set.union(*ids.values())) == 3          # three distinct connections
    assert at_level(0, pool.get) is at_level(0, pool.get)
    assert at_level(0, pool.get) is not at_level(1, pool.get)
    assert made == [0, 1, 2]                           # one factory call per level
    assert names_connected(redis_sock) == ["level-0", "level-1", "level-2"]

    # Outside a request: clients of its own (level None), apart from every level.
    outside = pool.get()
    assert outside.client_id() not in set.union(*ids.values())
    assert pool.get() is outside and made == [0, 1, 2, None]

    pool.close()
    for _ in range(100):
        if not names_connected(redis_sock):
            break
        gevent.sleep(0.02)
    assert names_connected(redis_sock) == []


def test_connection_is_exclusive_under_many_greenlets_and_per_level(redis_sock):
    made = []
    pool = level_pool(redis_sock, made, single=True)
    holders = {}            # client -> greenlet using it now
    seen = {0: set(), 1: set()}
    clashes = []

    def request(level, i):
        with pool.connection() as r:
            if holders.setdefault(r, getcurrent()) is not getcurrent():
                clashes.append(i)
            seen[level].add(r.client_id())
            r.set(b"k%d" % i, b"%d" % i)
            gevent.sleep(0.001 * (i % 3))
            assert r.get(b"k%d" % i) == b"%d" % i
            del holders[r]

    jobs = [gevent.spawn(at_level, i % 2, request, i % 2, i) for i in range(60)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert all(j.successful() for j in jobs) and not clashes
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # levels never share one
    # A level makes a client only when all of its own are busy: at most one
    # per greenlet in flight, and all of them idle again now.
    assert made.count(0) == len(seen[0]) <= 30 and made.count(1) == len(seen[1]) <= 30
    assert pool.idle(0) == len(seen[0]) and pool.idle(1) == len(seen[1])

    # Reuse: one request after another takes the most recently returned client.
    with at_level(0, pool.connection) as r1:
        pass
    with at_level(0, pool.connection) as r2:
        assert r2 is r1
    pool.close()


def test_bounded_pool_waits_then_times_out(redis_sock):
    made = []
    pool = level_pool(redis_sock, made, single=True, limit=3, timeout=5)
    busy, peak = [0], [0]

    def request(i):
        with pool.connection() as r:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
            r.execute_command("DEBUG", "SLEEP", "0.02")     # a Redis wait
            busy[0] -= 1

    jobs = [gevent.spawn(at_level, 1, request, i) for i in range(20)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert all(j.successful() for j in jobs)
    assert peak[0] == 3 and made == [1, 1, 1]       # never more than the limit

    quick = level_pool(redis_sock, [], single=True, limit=1, timeout=0.05)
    held = at_level(0, quick.connection)        # a level-0 checkout...
    held.__enter__()                            # ...holding its only client
    with pytest.raises(qstack.PoolTimeout, match="level 0"):
        with at_level(0, quick.connection):
            pass
    with quick.connection():            # level None is a level of its own
        pass
    held.__exit__(None, None, None)
    with at_level(0, quick.connection):         # back: the next one gets it
        pass
    pool.close()
    quick.close()


def test_a_client_left_by_an_exception_is_closed_not_reused(redis_sock):
    made = []
    pool = level_pool(redis_sock, made, single=True, limit=1)
    with pool.connection() as r:
        before = r.client_id()
    with pytest.raises(gevent.Timeout):
        with pool.connection() as r, gevent.Timeout(0.05):
            r.execute_command("DEBUG", "SLEEP", "0.3")   # the reply comes later
    with pool.connection() as r:        # a fresh one, not the one mid-reply
        assert r.client_id() != before and r.ping()
    assert len(made) == 2 and pool.idle() == 1
    pool.close()


def test_levels_through_a_real_server(redis_sock, serve):
    server = serve("tests.apps.levelredis:handle", "--framing", "line",
                   "--priority", "offset=0,value=0x21", "--workers", "4",
                   env={"QSTACK_TEST_REDIS": redis_sock})
    got = {}
    with server.connect() as s:
        for line in (b"hb\n", b"!req\n") * 3:
            s.sendall(line)
            level, cid = recv_line(s).split()
            got.setdefault(line[:1] == b"!", []).append((level, cid))
    levels = {level for pairs in got.values() for level, _ in pairs}
    if levels == {b"None"}:
        pytest.skip("this hub does not set qstack_level on its workers yet")
    assert {level for level, _ in got[True]} == {b"0"}
    assert {level for level, _ in got[False]} == {b"1"}
    ids = {urgent: {cid for _, cid in pairs} for urgent, pairs in got.items()}
    assert len(ids[True]) == len(ids[False]) == 1      # reused within a level
    assert not ids[True] & ids[False]                  # never shared across levels
