"""WSGI apps the HTTP tests serve (tests/test_http.py)."""

import gevent


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"Hello, World!"]


def echo(environ, start_response):
    """The request back: method, path, query, priority, headers seen, body."""
    body = environ["wsgi.input"].read()
    info = (f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']} "
            f"q={environ['QUERY_STRING']} prio={environ['qstack.priority']} "
            f"len={environ.get('CONTENT_LENGTH', '')} "
            f"x={environ.get('HTTP_X_TEST', '')}\n").encode()
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [info, body]


def big(environ, start_response):
    """A streamed response of ?n= 64 KiB blocks (generator: no length)."""
    n = int(environ["QUERY_STRING"].partition("=")[2] or 16)
    start_response("200 OK", [("Content-Type", "application/octet-stream")])

    def blocks():
        for i in range(n):
            yield bytes([65 + i % 26]) * 65536
    return blocks()


def sized(environ, start_response):
    """A streamed response with the app's own Content-Length."""
    n = 40
    start_response("200 OK", [("Content-Length", str(n * 10000))])
    return (b"0123456789" * 1000 for _ in range(n))


FLOOD = {"blocks": 0, "done": 0, "aborted": 0}


def flood(environ, start_response):
    """?n= blocks of 64 KiB from a generator, counted as they are made:
    /flood/count tells how far it got (a slow reader must hold it back)."""
    n = int(environ["QUERY_STRING"].partition("=")[2] or 1024)
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(n * 65536))])

    def blocks():
        finished = False
        try:
            for i in range(n):
                FLOOD["blocks"] += 1
                yield bytes([65 + i % 26]) * 65536
            finished = True
        finally:
            FLOOD["done" if finished else "aborted"] += 1
    return blocks()


UPLOAD = {"read": 0, "gate": None}


def upload(environ, start_response):
    """Reads the body in 64 KiB pieces, counting them as it goes
    (/upload/progress tells), waiting at ?hold=1 after the first piece
    until /upload/release; answers the body's length and sha256."""
    import hashlib
    from gevent.event import Event
    inp = environ["wsgi.input"]
    UPLOAD["read"] = 0
    if "hold=1" in environ["QUERY_STRING"]:
        UPLOAD["gate"] = Event()
    h, n = hashlib.sha256(), 0
    while True:
        piece = inp.read(65536)
        if not piece:
            break
        h.update(piece)
        n += len(piece)
        UPLOAD["read"] = n
        if UPLOAD["gate"] is not None:
            UPLOAD["gate"].wait(30)
            UPLOAD["gate"] = None
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"%d %s %s" % (n, h.hexdigest().encode(), type(inp).__name__.encode())]


def slow(environ, start_response):
    gevent.sleep(float(environ["QUERY_STRING"].partition("=")[2] or 0.05))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [environ["PATH_INFO"].encode()]


def fails(environ, start_response):
    raise RuntimeError("this app fails on purpose")


def router(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/upload/progress":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d" % UPLOAD["read"]]
    if path == "/upload/release":
        if UPLOAD["gate"] is not None:
            UPLOAD["gate"].set()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    if path.startswith("/upload"):
        return upload(environ, start_response)
    if path == "/flood/count":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d %d %d" % (FLOOD["blocks"], FLOOD["done"], FLOOD["aborted"])]
    if path.startswith("/flood"):
        return flood(environ, start_response)
    if path.startswith("/big"):
        return big(environ, start_response)
    if path.startswith("/sized"):
        return sized(environ, start_response)
    if path.startswith("/slow"):
        return slow(environ, start_response)
    if path.startswith("/fail"):
        return fails(environ, start_response)
    if path.startswith("/close"):
        start_response("200 OK", [("Connection", "close"), ("Content-Length", "3")])
        return [b"bye"]
    return echo(environ, start_response)
