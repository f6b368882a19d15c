"""`qstack serve --wsgi`: HTTP/1.1 conformance against real clients
(http.client and raw sockets), the smuggling and malformed cases, limits,
priority by path and header, on a real server on 127.0.0.1.

Every wait is bounded (socket timeouts); nothing asserts on time, only on
bytes and order."""

import http.client
import os
import selectors
import socket
import time

import pytest

from conftest import ROOT, ensure_built, recv_exact

ensure_built("_native", "build.py", "src", "qstack.h")

from qstack.transport import lib  # noqa: E402

if lib.qs_http_probe() != 0:
    pytest.skip("built without llhttp (Debian: node-llhttp; make test installs it)",
                allow_module_level=True)

ROUTER = "--wsgi=tests.apps.wsgi_apps:router"


def read_response(sock, buf=b"", head=False):
    """One response off a raw socket: (status line, headers dict, body, rest);
    ``head``: the answer to a HEAD (a length, no body)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"closed before a full head: {buf!r}")
        buf += chunk
    text, _, buf = buf.partition(b"\r\n\r\n")
    lines = text.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower().decode()] = v.strip().decode()
    n = 0 if head else int(headers.get("content-length", 0))
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("closed amid a body")
        buf += chunk
    return lines[0].decode(), headers, buf[:n], buf[n:]


def closed(sock):
    """True once the server closed: recv returns b"" (bounded by the timeout)."""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except ConnectionResetError:
        return True


@pytest.fixture
def server(serve):
    return serve(ROUTER)


# The framing lives in the connection layer every backend shares; the cases
# that touch its HTTP paths (refusal, 100 Continue, pipelining) run on both
# kernel-socket backends and both stack layouts.
LAYERS = [("uring", "thread"), ("kernel", "thread"), ("kernel", "inline"), ("uring", "inline")]


@pytest.fixture(params=LAYERS, ids=["-".join(p) for p in LAYERS])
def layered(request, serve):
    backend, stack = request.param
    if backend == "uring":
        from qstack.transport import uring_refusal
        if uring_refusal():
            pytest.skip(uring_refusal())
    return lambda *args: serve(ROUTER, "--backend", backend, "--stack", stack, *args)


def client(srv):
    return http.client.HTTPConnection(srv.host, srv.port, timeout=10)


def test_keep_alive_many_requests_one_connection(server):
    c = client(server)
    c.connect()
    sock = c.sock
    for i in range(20):
        c.request("POST", f"/p/{i}?k={i}", body=b"x" * i, headers={"X-Test": str(i)})
        r = c.getresponse()
        body = r.read()
        assert r.status == 200
        assert body == f"POST /p/{i} q=k={i} prio=1 len={i} x={i}\n".encode() + b"x" * i
        assert r.getheader("Server") == "qstack" and r.getheader("Date")
        assert r.getheader("Connection") is None          # HTTP/1.1: keep-alive implied
        assert c.sock is sock                              # never reconnected
    c.close()


def test_pipelined_replies_in_request_order(layered):
    """Three requests in one write; the first is slow, the others are not:
    replies still leave in request order."""
    server = layered()
    with server.connect() as s:
        s.settimeout(10)
        s.sendall(b"GET /slow/first?t=0.2 HTTP/1.1\r\nHost: h\r\n\r\n"
                  b"GET /second HTTP/1.1\r\nHost: h\r\n\r\n"
                  b"POST /third HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
        st1, _, b1, rest = read_response(s)
        st2, _, b2, rest = read_response(s, rest)
        st3, _, b3, rest = read_response(s, rest)
    assert (st1, st2, st3) == ("HTTP/1.1 200 OK",) * 3
    assert b1 == b"/slow/first"
    assert b2.startswith(b"GET /second ")
    assert b3.startswith(b"POST /third ") and b3.endswith(b"abc")


def test_headers_with_underscores_are_dropped(server):
    c = client(server)
    c.request("POST", "/u", body=b"abc", headers={"X_Test": "spoofed", "Transfer_Encoding": "chunked"})
    assert c.getresponse().read() == b"POST /u q= prio=1 len=3 x=\nabc"
    c.close()


def test_chunked_request_body(server):
    c = client(server)
    c.request("POST", "/c", body=iter([b"hello ", b"chunked ", b"world"]),
              encode_chunked=True)
    r = c.getresponse()
    assert r.read() == b"POST /c q= prio=1 len=19 x=\nhello chunked world"
    c.close()


def test_large_streamed_response_chunked_and_sized(server):
    c = client(server)
    c.request("GET", "/big?n=80")                   # 5 MiB from a generator
    r = c.getresponse()
    assert r.getheader("Transfer-Encoding") == "chunked"
    body = r.read()
    assert len(body) == 80 * 65536
    assert all(body[i * 65536:(i + 1) * 65536] == bytes([65 + i % 26]) * 65536
               for i in range(80))
    c.request("GET", "/sized")                      # the app's Content-Length, streamed
    r = c.getresponse()
    assert r.getheader("Content-Length") == "400000" and r.getheader("Transfer-Encoding") is None
    assert r.read() == b"0123456789" * 40000
    c.request("GET", "/after")                      # the connection is still good
    assert c.getresponse().read().startswith(b"GET /after ")
    c.close()


def test_head_has_no_body(server):
    with server.connect() as s:
        s.settimeout(10)
        s.sendall(b"HEAD /h HTTP/1.1\r\nHost: h\r\n\r\nHEAD /big?n=3 HTTP/1.1\r\nHost: h\r\n\r\n"
                  b"GET /g HTTP/1.1\r\nHost: h\r\n\r\n")
        st, hd, _, rest = read_response(s, head=True)
        assert st == "HTTP/1.1 200 OK" and hd["content-length"] == "26"   # GET's length
        # a streamed body: no length known, no body sent, no chunked framing
        st, hd, _, rest = read_response(s, rest, head=True)
        assert st == "HTTP/1.1 200 OK" and "transfer-encoding" not in hd
        st, _, body, rest = read_response(s, rest)
        assert st == "HTTP/1.1 200 OK" and body.startswith(b"GET /g ")


def test_expect_100_continue(layered):
    server = layered()
    with server.connect() as s:
        s.settimeout(10)
        s.sendall(b"PUT /up HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        assert recv_exact(s, 25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        st, _, body, _ = read_response(s)
    assert st == "HTTP/1.1 200 OK" and body.endswith(b"len=5 x=\nhello")


def test_http10_and_connection_close(server):
    with server.connect() as s:
        s.settimeout(10)
        s.sendall(b"GET /old HTTP/1.0\r\n\r\n")
        st, hd, body, _ = read_response(s)
        assert st == "HTTP/1.1 200 OK" and hd.get("connection") == "close"
        assert closed(s)
    with server.connect() as s:
        s.settimeout(10)
        s.sendall(b"GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                  b"GET /ka2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        st, hd, _, rest = read_response(s)
        assert hd.get("connection") == "keep-alive"
        st, _, body, _ = read_response(s, rest)
        assert body.startswith(b"GET /ka2 ")
    with server.connect() as s:
        s.settimeout(10)
        s.sendall(b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\nGET /never HTTP/1.1\r\n\r\n")
        st, hd, body, rest = read_response(s)
        assert hd.get("connection") == "close" and body.startswith(b"GET /x ")
        assert rest == b"" and closed(s)
    with server.connect() as s:                      # the app asks to close
        s.settimeout(10)
        s.sendall(b"GET /close HTTP/1.1\r\n\r\n")
        st, hd, body, _ = read_response(s)
        assert hd.get("connection") == "close" and body == b"bye" and closed(s)


def test_many_concurrent_connections(server):
    n = 1000
    sel = selectors.DefaultSelector()
    socks = []
    try:
        for i in range(n):
            s = socket.create_connection(server.addr, timeout=10)
            socks.append(s)
        for i, s in enumerate(socks):
            s.sendall(f"GET /c/{i} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, [i, b""])
        done = 0
        for _ in range(20 * n):                     # bounded: at most this many wake-ups
            if done == n:
                break
            events = sel.select(timeout=10)
            assert events, f"no progress with {n - done} replies missing"
            for key, _ in events:
                i, buf = key.data
                buf += key.fileobj.recv(65536)
                key.data[1] = buf
                if b"\r\n\r\n" in buf:
                    head, _, body = buf.partition(b"\r\n\r\n")
                    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    if len(body) == length:
                        assert body.startswith(f"GET /c/{i} ".encode())
                        sel.unregister(key.fileobj)
                        done += 1
        assert done == n
    finally:
        for s in socks:
            s.close()
        sel.close()


SMUGGLING = [
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3x\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\rX-A: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
    b"GET  /double-space HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r0hello\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\n: no-name\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
]


def test_smuggling_refused_with_400_and_close(layered):
    """Each case on its own connection behind a good request: that one is
    answered, then 400 and a close, and nothing after the bad bytes is
    served.  The server logs the protocol errors (rate-limited)."""
    srv = layered()
    for i, bad in enumerate(SMUGGLING):
        with srv.connect() as s:
            s.settimeout(10)
            s.sendall(b"GET /before HTTP/1.1\r\nHost: h\r\n\r\n" + bad)
            st, _, body, rest = read_response(s)
            assert st == "HTTP/1.1 200 OK" and body.startswith(b"GET /before "), i
            st, hd, _, rest = read_response(s, rest)
            assert st == "HTTP/1.1 400 Bad Request" and hd["connection"] == "close", i
            assert rest == b"" and closed(s), i          # nothing smuggled through
    srv.stop()
    assert "protocol errors" in srv.stderr and "127.0.0.1" in srv.stderr
    assert "Traceback" not in srv.stderr


LIMITS = [
    (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n\r\n", "414 URI Too Long"),
    (b"GET /" + b"a" * 300, "414 URI Too Long"),                 # no end of line yet
    (b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"y" * 600 + b"\r\n\r\n",
     "431 Request Header Fields Too Large"),
    (b"POST / HTTP/1.1\r\nContent-Length: 2000\r\n\r\n", "413 Content Too Large"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"z" * 1024
     + b"\r\n400\r\n" + b"z" * 1024 + b"\r\n", "413 Content Too Large"),
    (b"GET / HTTP/2.0\r\n\r\n", "505 HTTP Version Not Supported"),
]


def test_limits(serve):
    srv = serve(ROUTER, "--max-line", "256", "--max-head", "512", "--max-body", "1500")
    for req, status in LIMITS:
        with srv.connect() as s:
            s.settimeout(10)
            s.sendall(req)
            st, hd, _, _ = read_response(s)
            assert st == "HTTP/1.1 " + status and hd["connection"] == "close", req[:40]
            assert closed(s)
    c = client(srv)                         # at the limits: served
    c.request("POST", "/" + "a" * 200, body=b"b" * 1500)
    assert c.getresponse().read().endswith(b"b" * 1500)
    c.close()


def test_app_error_is_500_and_close(server):
    with server.connect() as s:
        s.settimeout(10)
        s.sendall(b"GET /fail HTTP/1.1\r\n\r\n")
        st, hd, _, _ = read_response(s)
        assert st == "HTTP/1.1 500 Internal Server Error" and closed(s)
    server.stop()
    assert "this app fails on purpose" in server.stderr


def test_access_log_gunicorn_format(serve):
    srv = serve(ROUTER, "--access-log")
    c = client(srv)
    c.request("GET", "/logged?a=1", headers={"User-Agent": "probe/1", "Referer": "http://r/"})
    assert c.getresponse().read()
    c.close()
    srv.stop()
    line = next(ln for ln in srv.stderr.splitlines() if "/logged" in ln)
    assert '"GET /logged?a=1 HTTP/1.1" 200 ' in line
    assert line.endswith('"http://r/" "probe/1"') and "127.0.0.1 - - [" in line


def test_priority_by_path_header_method_reaches_environ(serve):
    srv = serve(ROUTER, "--levels", "3", "--priority", "path=/api/urgent",
                "--priority", "header=X-Priority:high,level=1", "--priority", "method=PUT,level=1")
    c = client(srv)
    seen = {}
    for method, path, hdrs in [("GET", "/api/urgent", {}), ("GET", "/api/urgent/pay?x", {}),
                               ("GET", "/api/urgently", {}), ("GET", "/b", {"X-Priority": "high"}),
                               ("GET", "/b", {"X-Priority": "low"}), ("PUT", "/b", {}),
                               ("POST", "/api/urgent", {"X-Priority": "high"})]:
        c.request(method, path, body=b"" if method in ("PUT", "POST") else None, headers=hdrs)
        body = c.getresponse().read()
        seen[(method, path, hdrs.get("X-Priority"))] = int(body.split(b"prio=")[1][:1])
    c.close()
    assert seen == {("GET", "/api/urgent", None): 0, ("GET", "/api/urgent/pay?x", None): 0,
                    ("GET", "/api/urgently", None): 2, ("GET", "/b", "high"): 1,
                    ("GET", "/b", "low"): 2, ("PUT", "/b", None): 1,
                    ("POST", "/api/urgent", "high"): 0}


@pytest.mark.parametrize("rule, high", [
    ("path=/api/urgent", b"GET /api/urgent HTTP/1.1\r\nHost: h\r\n\r\n"),
    ("header=X-Priority:high", b"GET /slow/h?t=0 HTTP/1.1\r\nX-Priority: high\r\n\r\n"),
])
def test_priority_under_load(serve, rule, high):
    """Four workers, one held for level 0; 24 low requests of 0.15 s each
    queue up (about a second of work).  A high request sent after all of
    them is answered while most lows are still waiting."""
    srv = serve(ROUTER, "--workers", "4", "--priority", rule)
    lows = []
    try:
        for i in range(24):
            s = srv.connect()
            s.settimeout(15)
            s.sendall(f"GET /slow/low{i}?t=0.15 HTTP/1.1\r\nHost: h\r\n\r\n".encode())
            lows.append(s)
        # the first low replies prove the lows were read and are being served
        read_response(lows[0])
        with srv.connect() as h:
            h.settimeout(15)
            h.sendall(high)
            st, _, body, _ = read_response(h)
        assert st == "HTTP/1.1 200 OK" and b"prio=0" in body or body == b"/slow/h"
        # how many lows were answered by then: poll each without waiting
        answered = 1
        for s in lows[1:]:
            s.setblocking(False)
            try:
                if s.recv(1):
                    answered += 1
            except BlockingIOError:
                pass
        assert answered <= 12, f"{answered} of 24 low requests finished before the high one"
    finally:
        for s in lows:
            s.close()


def test_flask_app(serve):
    pytest.importorskip("flask")
    srv = serve("--wsgi=tests.apps.flask_app:app")
    c = client(srv)
    c.request("GET", "/hello/qstack?greeting=Hi")
    r = c.getresponse()
    assert r.status == 200 and r.read() == b"Hi, qstack!"
    c.request("POST", "/json", body=b'{"a": [1, 2]}', headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200 and r.read() == b'{"got":{"a":[1,2]},"priority":1}\n'
    c.request("GET", "/stream")
    r = c.getresponse()
    assert r.read() == b"".join(b"line %d\n" % i for i in range(1000))
    c.request("GET", "/missing")
    r = c.getresponse()
    assert r.status == 404 and r.read()
    c.close()


def test_django_app(serve):
    pytest.importorskip("django")
    srv = serve("--wsgi=tests.apps.django_app:application")
    c = client(srv)
    c.request("GET", "/hello/?name=qstack")
    r = c.getresponse()
    assert r.status == 200 and r.read() == b"Hello, qstack (priority 1)"
    c.request("POST", "/echo/", body=b"django body", headers={"Content-Type": "text/plain"})
    r = c.getresponse()
    assert r.status == 200 and r.read() == b"django body"
    c.close()


def test_bad_flags_are_one_line_exit_2():
    import subprocess
    import sys

    def run(*args):
        p = subprocess.run([sys.executable, "-m", "qstack", "serve", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": ROOT})
        return p.returncode, p.stderr.strip()

    code, err = run("--wsgi", "tests.apps.wsgi_apps:nope")
    assert code == 2 and err.count("\n") == 0 and "has no attribute 'nope'" in err
    code, err = run("--priority", "path=/x")
    assert code == 2 and "needs an HTTP app" in err
    code, err = run("--wsgi", "tests.apps.wsgi_apps:hello", "--priority", "path=x")
    assert code == 2 and "does not start with '/'" in err
    code, err = run("--wsgi", "tests.apps.wsgi_apps:hello", "--max-head", "20000")
    assert code == 2 and "http.max_head" in err and err.count("\n") == 0
    code, err = run("apps.echo:handle", "--wsgi", "tests.apps.wsgi_apps:hello")
    assert code == 2 and "give one of them" in err
    code, err = run("--wsgi", "tests.apps.wsgi_apps:hello", "--reply-order", "completion")
    assert code == 2 and "in order" in err
    code, err = run("--wsgi", "tests.apps.wsgi_apps:hello", "--priority", "header=X Y:1")
    assert code == 2 and "a header name" in err


def test_graceful_stop_finishes_the_request_in_flight(serve):
    import signal
    srv = serve(ROUTER, "--grace", "5")
    with srv.connect() as s:
        s.settimeout(10)
        s.sendall(b"GET /slow/last?t=0.3 HTTP/1.1\r\nHost: h\r\n\r\n")
        c = client(srv)                         # the request is in the app before the stop
        c.request("GET", "/ping")
        assert c.getresponse().read().startswith(b"GET /ping ")
        c.close()
        srv.proc.send_signal(signal.SIGTERM)
        st, _, body, _ = read_response(s)
    assert st == "HTTP/1.1 200 OK" and body == b"/slow/last"
    assert srv.stop() == 0 and "buffers in use 0" in srv.stderr


RELOAD_APP = '''
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"%s"]
'''


def test_sighup_reloads_the_wsgi_app(tmp_path):
    """--cores 2 under the supervisor: kill -HUP re-imports the app and the
    new cores answer; SIGTERM then stops everything with status 0."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import free_port, wait_port

    port = free_port()
    mod = tmp_path / "reloadwsgi.py"
    mod.write_text(RELOAD_APP % "one")
    p = subprocess.Popen([sys.executable, "-m", "qstack", "serve", "--wsgi", "reloadwsgi:app",
                          "--cores", "2", "--port", str(port), "--grace", "2"],
                         cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port(port, p)

        def get():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/")
            body = c.getresponse().read()
            c.close()
            return body

        assert get() == b"one"
        mod.write_text(RELOAD_APP % "two-the-new-one")   # a new size: no stale .pyc
        p.send_signal(signal.SIGHUP)
        seen = []
        for _ in range(400):                             # bounded: about 20 s at most
            seen.append(get())
            if seen[-1] == b"two-the-new-one":
                break
            time.sleep(0.05)
        assert seen[-1] == b"two-the-new-one" and set(seen) <= {b"one", b"two-the-new-one"}
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err.decode()[-2000:]
    assert b"SIGHUP: reloading" in err


def _flood_count(server):
    c = client(server)
    c.request("GET", "/flood/count")
    blocks, done, aborted = map(int, c.getresponse().read().split())
    c.close()
    return blocks, done, aborted


def _settled(server, until=lambda n: False, stable=3):
    """/flood/count once it stops moving (``stable`` more equal looks 0.2 s
    apart; None: never) or ``until`` holds; bounded: 50 looks."""
    last, same = None, 0
    for _ in range(50):
        now = _flood_count(server)
        if until(now):
            return now
        same = same + 1 if now == last else 0
        if stable is not None and same >= stable:
            return now
        last = now
        time.sleep(0.2)
    return now


def test_streamed_response_waits_for_a_slow_reader(server):
    """A generator of 64 MiB to a client that reads nothing: the worker
    stops pulling blocks once about SEND_HIGH_WATER is queued and the
    kernel's buffers are full (gunicorn blocks in send; without the wait
    the whole body was made and queued in the stack).  Then the client
    reads: every byte comes, in order, and the generator finishes."""
    n = 1024
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect((server.host, server.port))
    s.sendall(f"GET /flood?n={n} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    blocks, done, _ = _settled(server)
    assert done == 0 and blocks < n // 2, f"{blocks} of {n} blocks made for a non-reader"
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(65536)
    head, _, got = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    total, i = len(got), 0
    pending = got
    while total < n * 65536:
        chunk = s.recv(1 << 20)
        assert chunk, f"closed after {total} bytes"
        total += len(chunk)
        pending += chunk
        while len(pending) >= 65536:
            assert pending[:65536] == bytes([65 + i % 26]) * 65536, f"block {i}"
            pending = pending[65536:]
            i += 1
    s.close()
    assert total == n * 65536 and i == n
    assert _settled(server, until=lambda c: c[1] == 1)[:2] == (n, 1)


def test_non_reader_of_a_streamed_response_is_reset_and_the_app_closed(serve):
    """server.write_timeout still applies: the stack resets a client that
    reads nothing, and the waiting worker closes the app's iterator
    (without the wait the generator ran to its end instead)."""
    server = serve(ROUTER, "--write-timeout", "1")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect((server.host, server.port))
    s.sendall(b"GET /flood?n=1024 HTTP/1.1\r\nHost: h\r\n\r\n")
    blocks, done, aborted = _settled(server, until=lambda c: c[1] + c[2] > 0, stable=None)
    s.close()
    assert (done, aborted) == (0, 1) and blocks < 512
    c = client(server)                              # the worker is free again
    c.request("GET", "/after")
    assert c.getresponse().read().startswith(b"GET /after ")
    c.close()


# --- streamed request bodies ------------------------------------------------

def _get(server, path):
    c = client(server)
    c.request("GET", path)
    body = c.getresponse().read()
    c.close()
    return body


def _wait_for(server, path, until):
    """GET ``path`` until ``until(body)``: at most 50 looks, 0.1 s apart."""
    for _ in range(50):
        body = _get(server, path)
        if until(body):
            return body
        time.sleep(0.1)
    return body


def test_app_reads_the_body_while_it_arrives(layered):
    """Half of a 1 MiB body is sent; the app has already read from it (it
    streams: head first, then the body as it comes) before the rest is
    sent; then every byte arrives in order, and a pipelined request after
    it is answered in its turn."""
    import hashlib
    server = layered()
    body = hashlib.sha256(b"seed").digest() * (1 << 15)       # 1 MiB
    with server.connect() as s:
        s.settimeout(10)
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n"
                  % len(body) + body[:len(body) // 2])
        seen = int(_wait_for(server, "/upload/progress", lambda b: int(b) > 0))
        assert 0 < seen <= len(body) // 2, "the app did not start before the body was whole"
        s.sendall(body[len(body) // 2:] + b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
        st, _, got, rest = read_response(s)
        st2, _, got2, _ = read_response(s, rest)
    assert st == "HTTP/1.1 200 OK"
    assert got == b"%d %s _BodyInput" % (len(body), hashlib.sha256(body).hexdigest().encode())
    assert st2 == "HTTP/1.1 200 OK" and got2.startswith(b"GET /next ")


def test_chunked_body_streams_dechunked(server):
    """A 3 MiB chunked body in uneven chunks (sizes with extensions, split
    across writes) reaches the app de-chunked, then the connection goes on."""
    import hashlib
    import random
    rng = random.Random(5)
    data = rng.randbytes(3 << 20)
    wire, pos = [], 0
    while pos < len(data):
        n = min(rng.randint(1, 200000), len(data) - pos)
        ext = b";x=1" if n % 3 == 0 else b""
        wire.append(b"%x%s\r\n%s\r\n" % (n, ext, data[pos:pos + n]))
        pos += n
    wire = b"".join(wire) + b"0\r\nX-Trailer: t\r\n\r\n"
    with server.connect() as s:
        s.settimeout(10)
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(wire), 77777):
            s.sendall(wire[i:i + 77777])
        s.sendall(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
        st, _, got, rest = read_response(s)
        st2, _, got2, _ = read_response(s, rest)
    assert st == "HTTP/1.1 200 OK"
    assert got == b"%d %s _BodyInput" % (len(data), hashlib.sha256(data).hexdigest().encode())
    assert got2.startswith(b"GET /next ")


def test_body_backpressure_holds_the_client(serve):
    """An app that takes one piece of a 64 MiB body and waits: the server
    stops reading (the conn is paused, TCP pushes back), so the client can
    send no more than the kernel's buffers hold (without the pause the
    stack read it all into its pool).  Released, the app reads every byte."""
    import hashlib
    import threading
    server = serve(ROUTER, "--max-body", str(1 << 30))
    total = 64 << 20
    block = hashlib.sha256(b"b").digest() * 2048                # 64 KiB
    sent = [0]
    s = server.connect()
    s.settimeout(30)

    def sender():
        try:
            s.sendall(b"POST /upload?hold=1 HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n"
                      % total)
            for _ in range(total // len(block)):
                s.sendall(block)
                sent[0] += len(block)
        except OSError:
            pass

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    last, same = -1, 0
    for _ in range(100):                    # until the sender stops moving
        time.sleep(0.1)
        same = same + 1 if sent[0] == last else 0
        last = sent[0]
        if same >= 5:
            break
    assert sent[0] < total // 2, f"{sent[0]} of {total} bytes taken from a client while the app waits"
    assert _get(server, "/upload/release") == b"ok"
    t.join(30)
    st, _, got, _ = read_response(s)
    s.close()
    assert sent[0] == total, (st, got)
    h = hashlib.sha256()
    for _ in range(total // len(block)):
        h.update(block)
    assert got == b"%d %s _BodyInput" % (total, h.hexdigest().encode())


def test_streamed_body_limits_and_100_continue(serve):
    server = serve(ROUTER, "--max-body", "300000")
    with server.connect() as s:                 # 100-continue, then a streamed body
        s.settimeout(10)
        s.sendall(b"PUT /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 200000\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        assert recv_exact(s, 25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"z" * 200000)
        st, _, got, _ = read_response(s)
        assert st == "HTTP/1.1 200 OK" and got.startswith(b"200000 ")
    with server.connect() as s:                 # chunked past max_body: 413 amid the body
        s.settimeout(10)
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(40):
                s.sendall(b"2710\r\n" + b"q" * 10000 + b"\r\n")
        except OSError:
            pass
        st, _, _, _ = read_response(s)
        assert st == "HTTP/1.1 413 Content Too Large"
        assert closed(s)
    with server.connect() as s:                 # a bad chunk amid a streamed body: 400
        s.settimeout(10)
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + b"2710\r\n" + b"q" * 10000 + b"\r\n" + b"2710\r\n" + b"q" * 10000
                  + b"\r\nzz\r\n")
        st, _, _, _ = read_response(s)
        assert st == "HTTP/1.1 400 Bad Request"
