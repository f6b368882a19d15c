"""`qstack serve --wsgi` on the user-space stack (ustack over a TAP device
in a namespace of the test's own, tests/netns.py), answered by http.client
over Linux's TCP: keep-alive, a request body (small, and streamed),
pipelining, a streamed response.  The HTTP framing lives in the connection layer every backend
shares; this checks the WSGI server end to end over qstack's own TCP/IP."""

import hashlib
import http.client
import socket

import pytest

from conftest import ensure_built
from netns import TapNetns, why_not

ensure_built("_native", "build.py", "src", "qstack.h")

from qstack.transport import lib  # noqa: E402

pytestmark = pytest.mark.skipif(why_not() is not None, reason=str(why_not()))

if lib.qs_http_probe() != 0:
    pytest.skip("built without llhttp", allow_module_level=True)


def test_wsgi_over_ustack_tap(serve):
    net = TapNetns()
    try:
        with net.entered():
            server = serve("--wsgi=tests.apps.wsgi_apps:router", "--priority", "path=/api",
                           ustack=["--tap", net.dev])
            c = http.client.HTTPConnection(server.host, server.port, timeout=10)
            c.request("POST", "/api/pay?x=1", body=b"y" * 3000, headers={"X-Test": "u"})
            r = c.getresponse()
            assert r.status == 200
            assert r.read() == b"POST /api/pay q=x=1 prio=0 len=3000 x=u\n" + b"y" * 3000
            sock = c.sock
            up = bytes(range(256)) * 4096               # 1 MiB: a streamed request body
            c.request("POST", "/upload", body=up)
            r = c.getresponse()
            assert r.read() == b"%d %s _BodyInput" % (len(up), hashlib.sha256(up).hexdigest()
                                                      .encode())
            c.request("GET", "/big?n=40")               # 2.5 MiB, streamed, chunked
            r = c.getresponse()
            body = r.read()
            assert r.getheader("Transfer-Encoding") == "chunked"
            assert len(body) == 40 * 65536
            assert all(body[i * 65536:(i + 1) * 65536] == bytes([65 + i % 26]) * 65536
                       for i in range(40))
            assert c.sock is sock                       # kept alive
            c.close()
            with socket.create_connection((server.host, server.port), timeout=10) as s:
                s.sendall(b"GET /slow/a?t=0.1 HTTP/1.1\r\nHost: h\r\n\r\n"
                          b"GET /b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
                got = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            first, _, second = got.partition(b"HTTP/1.1 200 OK\r\n")[2].partition(
                b"HTTP/1.1 200 OK\r\n")
            assert first.endswith(b"\r\n\r\n/slow/a") and b"GET /b " in second
            serve.stop_all()        # exit 0, every pool and packet buffer back
    finally:
        net.close()
