"""HTTP framing and priority in the stack (qs_http_scan, http.c), sans-IO:
bytes in, a request boundary, a level or a refusal out.  Every request is
also scanned at every split point, as the stack sees it arrive."""

import pytest

from conftest import ensure_built  # noqa: E402

ensure_built("_native", "build.py", "src", "qstack.h")

from qstack.transport import ffi, lib  # noqa: E402

if lib.qs_http_probe() != 0:
    pytest.skip("built without llhttp (Debian: node-llhttp)", allow_module_level=True)

BAD, BODY, LINE, HEAD, VERSION = (lib.QS_HTTP_ERR_BAD, lib.QS_HTTP_ERR_BODY,
                                  lib.QS_HTTP_ERR_LINE, lib.QS_HTTP_ERR_HEAD,
                                  lib.QS_HTTP_ERR_VERSION)
PATH, HEADER, METHOD = lib.QS_HTTP_RULE_PATH, lib.QS_HTTP_RULE_HEADER, lib.QS_HTTP_RULE_METHOD


def framer(head=8192, line=4096, body=1 << 20):
    f = ffi.new("qs_framer *")
    f.kind, f.arg, f.max_line, f.max_message = lib.QS_FRAME_HTTP, head, line, body
    return f


F = framer()


def rules(*rs):
    arr = ffi.new("qs_http_rule[8]")
    for i, (kind, level, name, value) in enumerate(rs):
        r = arr[i]
        r.kind, r.level = kind, level
        r.name, r.name_len = name, len(name)
        r.value, r.value_len = value, len(value)
    return arr, len(rs)


def scan(data, f=F, rs=None):
    arr, n = rs if rs else (ffi.NULL, 0)
    need, level = ffi.new("uint64_t *"), ffi.new("int32_t *")
    expect, status = ffi.new("int32_t *"), ffi.new("int32_t *")
    r = lib.qs_http_scan(f, arr, n, data, len(data), need, level, expect, status)
    return r, need[0], level[0], expect[0], status[0]


def frame_all(stream, f=F):
    """The stack's way: scan from the request start, cut, again."""
    out, pos = [], 0
    while pos < len(stream):
        r = scan(stream[pos:], f)[0]
        if r <= 0:
            break
        out.append(stream[pos:pos + r])
        pos += r
    return out, pos


GET = b"GET /a?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"
POST = b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n")
HTTP10 = b"GET / HTTP/1.0\r\n\r\n"
EMPTY_VALUE = b"GET / HTTP/1.1\r\nX-Empty:\r\nX-Also: \r\nHost: h\r\n\r\n"
LEADING_CRLF = b"\r\nGET / HTTP/1.1\r\n\r\n"


@pytest.mark.parametrize("req", [GET, POST, CHUNKED, HTTP10, EMPTY_VALUE, LEADING_CRLF])
def test_complete_request_every_split(req):
    assert scan(req)[:2] == (len(req), 0)
    for cut in range(1, len(req)):
        r, need, _, _, status = scan(req[:cut])
        assert (r, status) == (0, 0), cut
        assert need in (0, len(req)), cut       # the total, once the head says it


def test_content_length_need():
    assert scan(POST[:-3])[1] == len(POST)


def test_pipelined_requests_framed_one_at_a_time():
    stream = GET + POST + CHUNKED + GET
    msgs, pos = frame_all(stream)
    assert msgs == [GET, POST, CHUNKED, GET] and pos == len(stream)


def test_expect_100_continue_once_head_is_complete():
    head = b"PUT /f HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    assert scan(head[:-2])[3] == 0
    assert scan(head)[:4] == (0, len(head) + 3, -1, 1)
    assert scan(head + b"abc")[0] == len(head) + 3


SMUGGLING = {
    "cl+te": b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te+cl": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    "dup-cl-same": b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "dup-cl-differ": b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "cl-junk": b"POST / HTTP/1.1\r\nContent-Length: 3a\r\n\r\nabc",
    "cl-sign": b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc",
    "cl-negative": b"POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\nabc",
    "chunk-size-junk": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "chunk-size-overflow": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"fffffffffffffffffff\r\n",
    "chunk-bare-lf": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
    "te-not-last-chunked": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\nabc",
    "te-unknown": b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\nabc",
    "obs-fold-space": b"GET / HTTP/1.1\r\nHost: a\r\n b\r\n\r\n",
    "obs-fold-tab": b"GET / HTTP/1.1\r\nX: a\r\n\tb\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "space-in-name": b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n",
    "bare-lf-request-line": b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    "bare-lf-header": b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
    "bare-cr-header": b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
    "ctl-in-value": b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
    "space-in-target": b"GET /a b HTTP/1.1\r\n\r\n",
    "two-spaces-before-target": b"GET  / HTTP/1.1\r\n\r\n",
    "two-spaces-after-target": b"GET /  HTTP/1.1\r\n\r\n",
    "empty-field-name": b"GET / HTTP/1.1\r\n:x\r\n\r\n",
    "http-0.9": b"GET /\r\n\r\n",
    # CVE-2023-30589: llhttp 8.1.0 takes a CR followed by any byte here
    "cr-ending-head": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r95\r\nhello\r\n0\r\n\r\n",
    "lf-ending-head": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\n5\r\nhello\r\n0\r\n\r\n",
    "cr-in-chunk-size": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r0hello\r\n0\r\n\r\n",
    "cr-after-last-chunk": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\rX: y\r\n\r\n",
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_smuggling_and_malformed_refused(name):
    r, _, _, _, status = scan(SMUGGLING[name])
    assert r < 0 and status in (BAD, VERSION if name == "http-0.9" else BAD), name


def test_version_other_than_1_is_505():
    assert scan(b"GET / HTTP/2.0\r\n\r\n")[4] == VERSION


def test_limits():
    f = framer(head=256, line=64, body=100)
    assert scan(b"GET /" + b"a" * 80, f)[4] == LINE               # no end of line yet
    assert scan(b"GET /" + b"a" * 80 + b" HTTP/1.1\r\n\r\n", f)[4] == LINE
    head = b"GET / HTTP/1.1\r\n" + b"X-A: yyyyyyyy\r\n" * 20
    assert scan(head, f)[4] == HEAD                                # incomplete, too long
    assert scan(head + b"\r\n", f)[4] == HEAD                      # complete, too long
    assert scan(b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n", f)[4] == BODY  # at once
    ok = b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
    assert scan(ok, f)[0] == len(ok)
    chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"40\r\n" + b"x" * 64 + b"\r\n"
    assert scan(chunked, f)[0] == 0
    assert scan(chunked * 1 + b"40\r\n" + b"x" * 64 + b"\r\n", f)[4] == BODY


def test_priority_rules_first_match_wins():
    rs = rules((PATH, 0, b"", b"/api/urgent"), (HEADER, 1, b"X-Priority", b"high"),
               (METHOD, 2, b"", b"GET"))
    level = lambda req: scan(req, rs=rs)[2]  # noqa: E731
    assert level(b"GET /api/urgent HTTP/1.1\r\n\r\n") == 0
    assert level(b"GET /api/urgent/pay?x=1 HTTP/1.1\r\n\r\n") == 0
    assert level(b"GET /api/urgent?x HTTP/1.1\r\n\r\n") == 0
    assert level(b"GET /api/urgentx HTTP/1.1\r\n\r\n") == 2        # not that path
    assert level(b"GET /api/urgentx HTTP/1.1\r\nx-priority: high \r\n\r\n") == 1
    assert level(b"POST /b HTTP/1.1\r\nX-PRIORITY: high\r\nContent-Length: 0\r\n\r\n") == 1
    assert level(b"POST /b HTTP/1.1\r\nX-Priority: High\r\nContent-Length: 0\r\n\r\n") == -1
    assert level(b"DELETE /api/urgent HTTP/1.1\r\nX-Priority: high\r\n\r\n") == 0


def test_header_rule_presence_and_trailing_slash_prefix():
    rs = rules((HEADER, 0, b"X-Urgent", b""), (PATH, 1, b"", b"/static/"))
    assert scan(b"GET / HTTP/1.1\r\nX-Urgent: whatever\r\n\r\n", rs=rs)[2] == 0
    assert scan(b"GET /static/a.css HTTP/1.1\r\n\r\n", rs=rs)[2] == 1
    assert scan(b"GET /staticx HTTP/1.1\r\n\r\n", rs=rs)[2] == -1


def test_chunk_framing_counts_toward_a_bound():
    """Chunk extensions carry no body bytes, so the body limit alone would
    not bound a request: the whole request may span head + 2 x body + 4 KiB."""
    f = framer(head=256, line=64, body=100)
    head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"1;ext=" + b"e" * 100 + b"\r\nx\r\n"
    assert scan(head + chunk * 10, f)[:2] == (0, 0)            # 10 body bytes: fine so far
    r, _, _, _, status = scan(head + chunk * 50, f)            # 50 bytes of body, 5.6 KB
    assert r < 0 and status == BODY


class _Conn:
    closed = 0

    def close(self):
        _Conn.closed += 1

    def send(self, data):
        raise AssertionError("nothing here streams")


class _Hub:
    def _handler_failed(self, conn, exc):
        raise AssertionError(f"the WSGI layer failed: {exc!r}")


class _Req:
    """What WSGIHandler reads of a request (the hub's Request, no hub)."""
    priority, conn_id, seq = 1, 7, 256
    conn, _hub = _Conn(), _Hub()

    def __init__(self, data):
        self.data = memoryview(data)


def test_whatever_the_framing_accepts_the_wsgi_layer_reads():
    """Seeded mutations of good requests: every one the native framing
    takes as a request, the Python side turns into an environ and a reply
    without raising (it re-reads the head without checking it again)."""
    import random
    from qstack.app.wsgi import WSGIHandler

    def app(environ, start_response):
        environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["PATH_INFO"].encode("latin-1")]

    h = WSGIHandler(app)
    h._peers[_Req.conn_id] = ("127.0.0.1", "1")
    rnd = random.Random(14)
    seeds = [GET, POST, CHUNKED, HTTP10, EMPTY_VALUE, LEADING_CRLF,
             b"GET http://h/abs/path?q=%41 HTTP/1.1\r\nHost: h\r\n\r\n",
             b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n"]
    alphabet = b" \t\r\n:;,/?%#=-_.aZ09\x00\x7f\xff"
    accepted = 0
    for i in range(30000):
        req = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randint(1, 3)):
            pos = rnd.randrange(len(req))
            op = rnd.randrange(3)
            if op == 0:
                req[pos] = rnd.choice(alphabet)
            elif op == 1:
                req.insert(pos, rnd.choice(alphabet))
            elif len(req) > 1:
                del req[pos]
        req = bytes(req)
        r = scan(req)[0]
        if r > 0:
            accepted += 1
            out = h(_Req(req[:r]))
            assert out.startswith(b"HTTP/1.1 "), req
    assert accepted > 1000          # the mutations do reach the Python side
