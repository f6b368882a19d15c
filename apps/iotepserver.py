"""iotepserver: QStack's IoT benchmark, on qstack and Redis.

    qstack redis up 4
    qstack serve apps.iotepserver:handle --config conf/iotepserver.yaml

An IoT front-end for very many devices sending bursts of fixed-size messages
(200 bytes by default: ``app.framing: fixed:200``).  A message whose byte 5
is 0x01 is a *request* (high priority, by the native rule in the config);
anything else is a *heartbeat* (low priority).  For every message the
handler, written in plain blocking style, does what QStack's worker threads
did against hiredis, in two round trips::

    GET 1\\b<conn id>  and  GET 2\\b<conn id>      (pipelined: one write, two replies)
    SET 1\\b<conn id> <the message's first 6 bytes>      if key 1 was missing
    SET 1\\b<conn id> <the old value, first byte + 1>    otherwise

(\\b is the byte 0x08; conn id in decimal).  These are QStack's commands
(GET 1, SET 1, GET 2) and values; GET 2 only moved ahead of the SET, which
nothing can observe: it reads a key no command writes.

A request then gets a 146-byte reply (an ``HTTP/1.1 200 OK`` header with
keep-alive and ``Content-Length: 100``, NUL-padded to 146 bytes, byte 6 set
to 0x03, as QStack sent it); a heartbeat gets none.

Redis servers and connections per level.  The servers are
``redis-server``s on unix sockets ``<redis_dir>/redis-<i>.sock`` (``qstack
redis up N`` starts them).  The connections live in a
:class:`qstack.LevelPool`: each priority level has its own, so a request's
commands never queue in a connection behind a heartbeat's.  A handler
checks a connection of its level out for the message and puts it back; a
level reuses its most recently returned connection and opens a new one
only when all of its others are busy, so a core holds at most ``workers``
connections per level.  QStack's worker i used Redis i; workers no longer
own connections (a worker serves both levels), so the rule now holds per
level: a level's connection i goes to server i mod N, i counted in the
order the level opens them in this core process.  At c messages in flight
on a level, its busy connections are spread over min(c, N) servers, as
QStack's busy workers were.  A device connection's messages take whichever
connection is free, so its keys may live on several servers, and two
messages of one device may race on its key when several workers run: that
is the benchmark's design, not a bug.

CPU per message.  redis-py's client methods cost far more Python than the
work they do (75-120 us of CPU per message for the three commands here,
measured by bench/iotep_cpu.py).  The handler drives redis-py's connection
objects directly: the commands are packed by hand in RESP2 (a few bytes
formatted with %), sent with ``send_packed_command`` and their replies read
with ``read_response``, which parses with hiredis (a dependency of qstack)
-- about 20 us per message (docs/IOTEP.md has the figures).  The connection still
does what matters from redis-py: connecting, timeouts, and turning socket
errors into RedisErrors.

Cooperation.  redis-py is a blocking library; :func:`init` runs
``gevent.monkey.patch_socket()`` in each core process (qstack calls it
there, after the fork, before the core listens), so redis-py's sockets are
gevent's and a worker waiting on Redis only suspends its own greenlet: the
hub hands the rings to another worker.  Patching there rather than at
import keeps the supervisor process (which imports the handler to check it)
unpatched, and patches before any Redis connection exists.

Faults.  ``init`` PINGs every server: one unreachable stops start-up with
one line (``redis not reachable at ...``) and exit 2.  While serving, a
Redis error (the server died, timed out after ``redis_timeout`` s) answers
that message with nothing, counts it in ``redis_errors`` per priority level
(``--stats`` and the exit log show them: nothing is lost silently), and is
logged once per burst per server -- then a reminder every 10 s while it
lasts, and one line when the server answers again.  A connection Redis
dropped reconnects at once, on its next use, so a restarted Redis is used
again without a restart of qstack.  After an error the handler rests 50 ms
still holding the failed connection, so a dead server's connections take
few messages while those of the healthy servers serve the rest.  A
connection that may have a reply unread (a timeout, an error reply to the
first of two commands) is disconnected: its next message reconnects rather
than read a stale reply.
"""

import logging
import time

import gevent
import qstack
from qstack.errors import ConfigError
from qstack.redisctl import DEFAULT_COUNT, DEFAULT_DIR, ping, socket_path

__all__ = ["handle", "init", "reply_bytes"]

log = logging.getLogger("qstack.iotepserver")

# app.settings and their defaults (the same as conf/iotepserver.yaml and
# `qstack redis up`).
DEFAULTS = {
    "redis_dir": DEFAULT_DIR,     # where redis-<i>.sock live (qstack redis up --dir)
    "redis_count": DEFAULT_COUNT,  # servers redis-0.sock .. redis-<count-1>.sock
    "redis_timeout": 5.0,         # seconds for one Redis command or connect
    "request_offset": 5,          # byte that tells a request from a heartbeat...
    "request_value": 0x01,        # ...and its value for a request
    "value_bytes": 6,             # how many leading message bytes SET stores
    "reply_size": 146,            # bytes in a request's reply
    "content_length": 100,        # the reply header's Content-Length
}
REMIND_EVERY = 10.0               # seconds between "still failing" log lines
FAIL_PAUSE = 0.05                 # seconds a worker rests after a Redis error
COUNTER = "redis_errors"

_HEADER = (b"HTTP/1.1 200 OK\r\n"
           b"Date: 25.11.1985\r\n"
           b"Server: Webserver on Middlebox TCP (Ubuntu)\r\n"
           b"Content-Length: %d\r\n"
           b"Connection: keep-alive\r\n\r\n")


def reply_bytes(size=146, content_length=100):
    """The reply to a request: QStack's header, NUL-padded, byte 6 = 0x03."""
    head = _HEADER % content_length
    if size < len(head):
        raise ConfigError(f"app.settings.reply_size: {size} is shorter than the "
                          f"reply header ({len(head)} bytes)")
    out = bytearray(head.ljust(size, b"\0"))
    out[6] = 0x03
    return bytes(out)


# --- settings ----------------------------------------------------------------

def _setting(settings, name, want, ok):
    value = settings.get(name, DEFAULTS[name])
    if isinstance(value, bool) or not ok(value):
        raise ConfigError(f"app.settings.{name}: expected {want}, got {value!r}")
    return value


def _int(lo, hi):
    return f"an integer in {lo}..{hi}", lambda v: isinstance(v, int) and lo <= v <= hi


def parse_settings(settings):
    """Check app.settings for iotepserver; returns a complete dict."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown setting 'app.settings.{unknown[0]}' for iotepserver "
                          f"(known: {', '.join(DEFAULTS)})")
    number = ("a number > 0", lambda v: isinstance(v, (int, float)) and v > 0)
    text = ("a non-empty string", lambda v: isinstance(v, str) and v != "")
    return {
        "redis_dir": _setting(settings, "redis_dir", *text),
        "redis_count": _setting(settings, "redis_count", *_int(1, 256)),
        "redis_timeout": float(_setting(settings, "redis_timeout", *number)),
        "request_offset": _setting(settings, "request_offset", *_int(0, 65535)),
        "request_value": _setting(settings, "request_value", *_int(0, 255)),
        "value_bytes": _setting(settings, "value_bytes", *_int(1, 1 << 20)),
        "reply_size": _setting(settings, "reply_size", *_int(1, 1 << 20)),
        "content_length": _setting(settings, "content_length", *_int(0, 1 << 30)),
    }


# --- one Redis server, as this core process sees it ---------------------------

class _Server:
    """A Redis server's path and health; logs failures once per burst."""

    __slots__ = ("path", "failing", "burst", "unlogged", "logged_at")

    def __init__(self, path):
        self.path = path
        self.failing = False
        self.burst = 0          # errors since the server last answered
        self.unlogged = 0       # errors since the last log line
        self.logged_at = 0.0

    def failed(self, exc, level):
        qstack.count(COUNTER, level)
        now = time.monotonic()
        self.burst += 1
        if not self.failing:
            self.failing = True
            self.logged_at, self.unlogged = now, 0
            log.warning("redis %s failed: %s; messages served through it get no "
                        "reply until it answers again (counted as %s)",
                        self.path, _one_line(exc), COUNTER)
        else:
            self.unlogged += 1
            if now - self.logged_at >= REMIND_EVERY:
                log.warning("redis %s still failing: %d more errors in the last %.0f s",
                            self.path, self.unlogged, now - self.logged_at)
                self.logged_at, self.unlogged = now, 0

    def recovered(self):
        log.warning("redis %s answers again after %d failed messages",
                    self.path, self.burst)
        self.failing = False
        self.burst = 0


def _one_line(exc):
    """Why a Redis command failed, briefly: the OS's reason when there is one."""
    for cause in (exc.__cause__, exc.__context__):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    return " ".join(str(exc).split()).rstrip(".") or type(exc).__name__


class _Link:
    """One Redis connection of a level's pool, and the server it goes to."""

    __slots__ = ("server", "conn")

    def __init__(self, server, conn):
        self.server = server
        self.conn = conn


def _new_link():
    """LevelPool factory: the level's next connection, to server i mod N.

    It runs in the handler's greenlet, so current_level() is the level the
    connection will serve.  Connecting waits for the first command, inside
    the handler's try: a dead server is a counted error, not a crash."""
    if not _servers:
        raise RuntimeError("iotepserver is not initialised: set app.init to "
                           "apps.iotepserver:init (see conf/iotepserver.yaml)")
    level = qstack.current_level()
    i = _made.get(level, 0)
    _made[level] = i + 1
    server = _servers[i % len(_servers)]
    return _Link(server, _connect(server.path))


def _close_link(link):
    link.conn.disconnect()


# --- per-process state, set by init() --------------------------------------------

_pool = qstack.LevelPool(_new_link, close=_close_link)
_made = {}              # level -> connections made so far (server i mod N)
_servers = []
_reply = b""
_offset = 5
_value = 0x01
_nbytes = 6
_redis_error = None     # redis.RedisError once init ran
_connection_error = None
_connect = None

# The commands, packed by hand in Redis's protocol (RESP): the keys are
# b"1\x08<id>" and b"2\x08<id>", 2 + len(id) bytes.  GET 1 and GET 2 go in
# one round trip (independent: GET 2 reads a key nothing writes), the SET
# in a second one, as it needs GET 1's answer.
_GETS = b"*2\r\n$3\r\nGET\r\n$%d\r\n1\x08%b\r\n*2\r\n$3\r\nGET\r\n$%d\r\n2\x08%b\r\n"
_SET = b"*3\r\n$3\r\nSET\r\n$%d\r\n1\x08%b\r\n$%d\r\n%b\r\n"


def init(settings):
    """app.init: make redis-py cooperative, check every server answers."""
    global _servers, _reply, _offset, _value, _nbytes, _redis_error, _connect
    global _connection_error
    s = parse_settings(settings)
    reply = reply_bytes(s["reply_size"], s["content_length"])

    from gevent import monkey
    monkey.patch_socket()
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from redis.utils import HIREDIS_AVAILABLE

    timeout = s["redis_timeout"]
    servers = [_Server(socket_path(s["redis_dir"], i)) for i in range(s["redis_count"])]
    for server in servers:
        why = ping(server.path, timeout)
        if why is not None:
            raise ConfigError(f"redis not reachable at {server.path}: {why} (start "
                              f"the servers with: qstack redis up {s['redis_count']} "
                              f"--dir {s['redis_dir']})")

    def connect(path):
        # redis-py's connection alone, not a client: it connects on first
        # use, maps socket errors and timeouts to RedisErrors and
        # disconnects on them, and parses replies with hiredis when it is
        # installed.  _call() retries a dropped connection itself.  RESP2, as
        # QStack's hiredis spoke: no HELLO round trip when connecting.
        return redis.UnixDomainSocketConnection(
            path=path, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), protocol=2, lib_name=None, lib_version=None)

    _pool.close()
    _made.clear()
    _servers = servers
    _reply = reply
    _offset, _value, _nbytes = s["request_offset"], s["request_value"], s["value_bytes"]
    _redis_error = redis.RedisError
    _connection_error = redis.ConnectionError
    _connect = connect
    log.info("iotepserver: %d redis server(s) in %s, reply %d bytes to messages "
             "with byte %d = %#04x, %s", len(servers), s["redis_dir"], len(reply),
             _offset, _value, "hiredis parser" if HIREDIS_AVAILABLE else
             "redis-py's Python parser (pip install hiredis: less CPU per message)")


def _call(conn, packed, replies):
    """Send packed commands in one write, read their replies; the first one.

    A connection Redis dropped is retried once at once: that is a restarted
    server being used again.  A timeout is not retried (the server is slow,
    waiting twice helps nobody).  After any other error the connection is
    dropped, so a reply left unread is never taken for the next one."""
    for retry in (True, False):
        try:
            conn.send_packed_command((packed,), check_health=False)
            first = conn.read_response()
            if replies == 2:
                conn.read_response()
            return first
        except _connection_error:
            if retry:
                continue            # redis-py disconnected it: reconnect once
            conn.disconnect()
            raise
        except BaseException:
            conn.disconnect()
            raise


def handle(req):
    data = req.data
    cid = b"%d" % req.conn_id
    n = len(cid) + 2
    with _pool.connection() as link:
        conn = link.conn
        try:
            old = _call(conn, _GETS % (n, cid, n, cid), 2)
            if old is None:
                value = bytes(data[:_nbytes])
            elif old:
                value = bytes(((old[0] + 1) & 0xFF,)) + old[1:]
            else:
                value = old
            _call(conn, _SET % (n, cid, len(value), value), 1)
        except _redis_error as exc:
            link.server.failed(exc, req.priority)
            # A dead server fails at once; without a rest its connection
            # would take message after message (never blocking, its worker
            # keeps the lead) while the healthy servers' ones wait on their
            # replies.  It rests checked out: no other message takes it.
            gevent.sleep(FAIL_PAUSE)
            return None
        if link.server.failing:
            link.server.recovered()
    if len(data) > _offset and data[_offset] == _value:
        return _reply
    return None
