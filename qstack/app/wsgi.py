"""WSGI (PEP 3333) on qstack's message handlers: ``qstack serve --wsgi M:APP``.

The stack thread frames HTTP/1.x with llhttp (native/src/http.c): each
message the hub gets is one complete, validated request -- head, body and
chunk framing -- classified by the HTTP priority rules before any Python
runs.  What is left here is the WSGI contract, kept small per request:

- the head is split with bytes methods only (llhttp already refused
  anything malformed, so no check is repeated), header names map to
  environ keys through a cache, and environ starts as a copy of a
  per-server template;
- the response head is joined once from cached pieces (the status line
  per status, Date once a second, Server and the keep-alive line fixed);
- a response the app gives as one or a few chunks (a list, most
  frameworks' bodies) leaves as one reply with a Content-Length, written
  by the stack after the replies before it (``server.reply_order:
  arrival``); a longer iterator is streamed: the head and each chunk are
  sent as they come (chunked if the app set no Content-Length), in this
  request's place on the connection.

A request the framing refused reaches us as one byte, QS_HTTP_ERR_*
(qstack.h): it is answered with its status and the connection closes; the
stack has counted it in protocol_errors and logs it rate-limited.

gunicorn's behaviour is the reference where PEP 3333 is silent: Date and
Server are added unless the app set them, ``Connection: close`` goes out
when the client or the app asked for it (or for HTTP/1.0 without
keep-alive), and the access log uses its format.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from email.utils import formatdate
from urllib.parse import unquote_to_bytes

__all__ = ["WSGIHandler"]

log = logging.getLogger("qstack")
access_log = logging.getLogger("qstack.access")

STREAM_AFTER = 65536    # bytes of an unfinished body buffered before streaming starts

_ERRORS = {
    1: (400, "Bad Request"),
    2: (413, "Content Too Large"),
    3: (414, "URI Too Long"),
    4: (431, "Request Header Fields Too Large"),
    5: (505, "HTTP Version Not Supported"),
}
_ERROR_REPLY = {code: (f"HTTP/1.1 {status} {text}\r\nConnection: close\r\n"
                       f"Content-Type: text/plain\r\nContent-Length: {len(text) + 1}\r\n\r\n"
                       f"{text}\n").encode("latin-1")
                for code, (status, text) in _ERRORS.items()}
_500 = (b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 22\r\n\r\nInternal Server Error\n")

_SPECIAL = {"CONTENT_TYPE", "CONTENT_LENGTH"}
_HOP = {"connection", "transfer-encoding", "keep-alive"}


def _key(name: bytes) -> str:
    key = name.decode("latin-1").upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


class _Input(io.BufferedIOBase):
    """wsgi.input: the request body, read from the bytes the stack framed
    (up to http.max_body; nothing is read past them)."""

    def __init__(self, body: bytes) -> None:
        self._b = io.BytesIO(body)
        self.read = self._b.read
        self.readline = self._b.readline
        self.readlines = self._b.readlines
        self.readinto = self._b.readinto

    def readable(self) -> bool:
        return True

    def __iter__(self):
        return iter(self._b)


_EMPTY = b""


def _dechunk(data: bytes, start: int) -> bytes:
    """The body of a chunked request llhttp has validated (sizes, CRLFs)."""
    out = []
    pos = start
    while True:
        eol = data.index(b"\r\n", pos)
        size = int(data[pos:eol].split(b";", 1)[0], 16)
        if size == 0:
            return b"".join(out)
        pos = eol + 2
        out.append(data[pos:pos + size])
        pos += size + 2


class _StartResponse:
    __slots__ = ("status", "headers", "sent", "writes")

    def __init__(self) -> None:
        self.status = None
        self.headers = None
        self.sent = False
        self.writes = None

    def __call__(self, status, headers, exc_info=None):
        if exc_info is not None:
            try:
                if self.sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called twice without exc_info")
        if not isinstance(status, str):
            raise TypeError(f"status must be a str, got {type(status).__name__}")
        self.status = status
        self.headers = headers
        return self.write

    def write(self, data):
        # PEP 3333's legacy write(): buffered before the body the app returns.
        if self.writes is None:
            self.writes = []
        self.writes.append(bytes(data))


class WSGIHandler:
    """The message handler that runs one WSGI app: ``handler(req)``."""

    def __init__(self, app, *, server_name="127.0.0.1", server_port=8000,
                 multiprocess=False, access=False, server_header="qstack") -> None:
        self.app = app
        self.access = access
        self._template = {
            "SCRIPT_NAME": "",
            "SERVER_NAME": server_name,
            "SERVER_PORT": str(server_port),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": bool(multiprocess),
            "wsgi.run_once": False,
        }
        self._keys: dict[bytes, str] = {}
        self._status: dict[str, bytes] = {}
        self._server = f"Server: {server_header}\r\n".encode("latin-1")
        self._date_t = 0
        self._date = b""
        self._peers: dict[int, tuple[str, int] | None] = {}

    # -- the cached pieces --------------------------------------------------

    def _date_line(self) -> bytes:
        now = int(time.time())
        if now != self._date_t:
            self._date_t = now
            self._date = f"Date: {formatdate(now, usegmt=True)}\r\n".encode("latin-1")
        return self._date

    def _peer(self, req):
        peers = self._peers
        try:
            return peers[req.conn_id]
        except KeyError:
            if len(peers) > 65536:
                peers.clear()       # conn ids are never reused: old ones only cost memory
            p = peers[req.conn_id] = req.conn.peer
            return p

    # -- one request --------------------------------------------------------

    def __call__(self, req):
        data = req.data
        if len(data) == 1:
            return self._refused(req, data[0])
        raw = data.tobytes()
        head_end = raw.index(b"\r\n\r\n")
        lines = raw[:head_end].split(b"\r\n")
        while not lines[0]:                    # empty lines before the request line
            del lines[0]
        method, target, version = lines[0].split(b" ")
        env = self._template.copy()
        keys = self._keys
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            key = keys.get(name)
            if key is None:
                key = keys[name] = _key(name)
            value = value.strip().decode("latin-1")
            if key in env:
                value = env[key] + "," + value
            env[key] = value
        method = method.decode("latin-1")
        path, _, query = target.partition(b"?")
        if b"%" in path:
            path = unquote_to_bytes(path)
        if path[:1] != b"/":                   # absolute-form / authority-form targets
            if b"://" in path:
                path = b"/" + path.split(b"://", 1)[1].partition(b"/")[2]
            elif path == b"*":
                pass
        protocol = version.decode("latin-1")
        env["REQUEST_METHOD"] = method
        env["PATH_INFO"] = path.decode("latin-1")
        env["QUERY_STRING"] = query.decode("latin-1")
        env["SERVER_PROTOCOL"] = protocol
        env["RAW_URI"] = target.decode("latin-1")
        env["qstack.priority"] = req.priority
        peer = self._peer(req)
        if peer is not None:
            env["REMOTE_ADDR"] = peer[0]
            env["REMOTE_PORT"] = str(peer[1])
        else:
            env["REMOTE_ADDR"] = ""
        body_start = head_end + 4
        if "HTTP_TRANSFER_ENCODING" in env:
            body = _dechunk(raw, body_start)
            env["CONTENT_LENGTH"] = str(len(body))
        else:
            body = raw[body_start:] if body_start < len(raw) else _EMPTY
        env["wsgi.input"] = _Input(body)
        conn_hdr = env.get("HTTP_CONNECTION")
        if protocol == "HTTP/1.1":
            keep = conn_hdr is None or "close" not in conn_hdr.lower()
        else:
            keep = conn_hdr is not None and "keep-alive" in conn_hdr.lower()
        return self._respond(req, env, method, protocol, keep)

    def _respond(self, req, env, method, protocol, keep):
        sr = _StartResponse()
        t0 = time.time() if self.access else 0.0
        try:
            result = self.app(env, sr)
        except Exception as exc:
            self._failed(req, exc)
            req.conn.close()
            return _500
        chunks = sr.writes or []
        size = sum(map(len, chunks))
        close = getattr(result, "close", None)
        streamed = False
        sent = 0
        try:
            it = iter(result)
            for chunk in it:
                if chunk:
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > STREAM_AFTER:
                        streamed = True
                        break
            if sr.status is None:
                raise RuntimeError("the WSGI app returned without calling start_response")
            head_only = method == "HEAD"
            if not streamed:
                head, keep = self._head(sr, protocol, keep, size, False, head_only)
                sent = 0 if head_only else size
                out = head if head_only else head + b"".join(chunks)
                if not keep:
                    req.conn.close()
                if self.access:
                    self._access(req, env, sr.status, sent, t0)
                return out
            # streaming: the head, what we have, then the rest as it comes
            head, keep, chunked = self._head(sr, protocol, keep, None, True, head_only)
            send = req.conn.send
            sr.sent = True
            if head_only:
                send(head)
                for _ in it:
                    pass
            else:
                body = b"".join(chunks)
                send(head + (b"%x\r\n%s\r\n" % (len(body), body) if chunked else body))
                sent = len(body)
                for chunk in it:
                    if chunk:
                        send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                        sent += len(chunk)
            if not keep:
                req.conn.close()
            if self.access:
                self._access(req, env, sr.status, sent, t0)
            return b"0\r\n\r\n" if chunked and not head_only else None
        except Exception as exc:
            self._failed(req, exc)
            req.conn.close()
            return None if sr.sent else _500
        finally:
            if close is not None:
                try:
                    close()
                except Exception as exc:
                    self._failed(req, exc)

    def _head(self, sr, protocol, keep, size, streaming, head_only):
        """The response head; with ``streaming`` also whether the body is chunked."""
        status = sr.status
        line = self._status.get(status)
        if line is None:
            line = self._status[status] = f"HTTP/1.1 {status}\r\n".encode("latin-1")
        parts = [line]
        have_len = have_date = have_server = False
        for name, value in sr.headers:
            low = name.lower()
            if low == "content-length":
                have_len = True
            elif low == "date":
                have_date = True
            elif low == "server":
                have_server = True
            elif low in _HOP:
                if low == "connection" and "close" in value.lower():
                    keep = False
                continue            # hop-by-hop: ours to set (PEP 3333)
            parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        if not have_date:
            parts.append(self._date_line())
        if not have_server:
            parts.append(self._server)
        chunked = False
        code = status[:3]
        bodiless = code in ("204", "304") or code[0] == "1"
        if not have_len and not bodiless:
            if size is not None:
                parts.append(b"Content-Length: %d\r\n" % size)
            elif protocol == "HTTP/1.1":
                chunked = not head_only
                if chunked:
                    parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                keep = False        # HTTP/1.0, length unknown: the close ends the body
        if not keep:
            parts.append(b"Connection: close\r\n")
        elif protocol != "HTTP/1.1":
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        return (head, keep, chunked) if streaming else (head, keep)

    def _refused(self, req, code):
        req.conn.close()
        return _ERROR_REPLY.get(code, _ERROR_REPLY[1])

    def _failed(self, req, exc):
        hub = req._hub
        hub._handler_failed(req.conn_id, exc)

    def _access(self, req, env, status, sent, t0):
        """gunicorn's default format: h l u t "r" s b "f" "a"."""
        took = time.time() - t0
        t = time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(t0))
        request = f"{env['REQUEST_METHOD']} {env['RAW_URI']} {env['SERVER_PROTOCOL']}"
        fields = {"remote": env.get("REMOTE_ADDR") or "-", "request": request,
                  "status": int(status[:3]), "bytes": sent, "priority": req.priority,
                  "ms": round(took * 1e3, 3)}
        access_log.info('%s - - %s "%s" %s %s "%s" "%s"', fields["remote"], t, request,
                        status[:3], sent or "-", env.get("HTTP_REFERER", "-"),
                        env.get("HTTP_USER_AGENT", "-"), extra={"access": fields})
