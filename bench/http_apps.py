"""The apps bench/http_wsgi.py serves on every server (WSGI, and Flask)."""


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
    return [b"Hello, World!"]


def _flask():
    from flask import Flask
    app = Flask(__name__)

    @app.get("/")
    def index():
        return "Hello, World!"

    return app


flask_app = _flask()


def _spin(seconds):
    from time import perf_counter
    end = perf_counter() + seconds
    while perf_counter() < end:
        pass


def prio(environ, start_response):
    """/api/urgent answers at once; any other path first computes for 1 ms
    (CPU, as a template render or JSON encode would: no sleep to hide in)."""
    if not environ["PATH_INFO"].startswith("/api/urgent"):
        _spin(0.001)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


# uvicorn runs ASGI: the same two apps as raw ASGI callables (no framework).

async def hello_asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")]})
    await send({"type": "http.response.body", "body": b"Hello, World!"})


async def prio_asgi(scope, receive, send):
    """prio's ASGI twin: the 1 ms of CPU blocks the event loop, as it blocks
    a WSGI worker."""
    if scope["type"] != "http":
        return
    if not scope["path"].startswith("/api/urgent"):
        _spin(0.001)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
