"""WSGI (PEP 3333) on qstack's message handlers: ``qstack serve --wsgi M:APP``.

The stack thread frames HTTP/1.x with llhttp (native/src/http.c): each
message the hub gets is one complete, validated request -- head, body and
chunk framing -- classified by the HTTP priority rules before any Python
runs.  What is left here is the WSGI contract, kept small per request:

- the head is decoded once (latin-1) and split with str methods only
  (the framing already refused anything malformed, so no check is
  repeated), header names map to environ keys through a cache (names
  with "_" are dropped, as gunicorn and nginx drop them), and environ
  starts as a copy of a per-server template;
- a response head is cached by status, headers, length and connection
  state, and rebuilt once a second (its Date);
- a response the app gives as a list (most frameworks' bodies) leaves as
  one reply with a Content-Length, written
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
from random import random
from time import time as _time
from email.utils import formatdate
from urllib.parse import unquote_to_bytes

__all__ = ["WSGIHandler"]

access_log = logging.getLogger("qstack.access")

STREAM_AFTER = 65536    # bytes of an unfinished body buffered before streaming starts
SEND_HIGH_WATER = 256 << 10     # a streamed body this far ahead of the client: wait

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

# What the head builder does with a response header, by name as the app spells it.
_LENGTH, _DATE, _SERVER, _CONNECTION, _HOP, _OTHER = range(6)
_KINDS = {"content-length": _LENGTH, "date": _DATE, "server": _SERVER,
          "connection": _CONNECTION, "transfer-encoding": _HOP, "keep-alive": _HOP}
_kind_cache: dict[str, int] = {}


def _kind(name: str) -> int:
    k = _kind_cache.get(name)
    if k is None:
        k = _kind_cache[name] = _KINDS.get(name.lower(), _OTHER)
    return k


def _key(name: str) -> str:
    """The environ key of a header; "" for a name with "_", dropped as
    gunicorn and nginx drop them: ``X_Forwarded_For`` or ``Transfer_Encoding``
    would otherwise land on the key of the real header."""
    if "_" in name:
        return ""
    key = name.upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


class _NoBody:
    """wsgi.input of a request without a body: stateless, so one serves all."""

    __slots__ = ()

    def read(self, size=-1):
        return b""

    def readline(self, size=-1):
        return b""

    def readlines(self, hint=-1):
        return []

    def __iter__(self):
        return iter(())


_NO_BODY = _NoBody()


class _BodyError(OSError):
    """A streamed body that will not complete: the stack refused it
    (.status, a QS_HTTP_ERR_* code: answered 400/413 if the app lets it
    through) or the client left (.status 0)."""

    def __init__(self, status, text):
        super().__init__(text)
        self.status = status


class _BodyInput:
    """wsgi.input of a streamed body (one too large for a pool buffer: see
    http.c "Streamed request bodies").  read() takes the pieces the stack
    sends as they come; the conn is paused while the app leaves more than
    BODY_PAUSE_AT bytes (hub.py) untaken, so a slow app holds little."""

    __slots__ = ("_hub", "_conn", "_seq", "_level", "_buf", "done")

    def __init__(self, req):
        self._hub = req._hub
        self._conn = req.conn_id
        self._seq = req.seq >> 8        # QS_SEQ_SHIFT
        self._level = req.priority
        self._buf = bytearray()
        self.done = False

    def _more(self):
        """Append the next piece to _buf; False at the end of the body."""
        if self.done:
            return False
        try:
            data, last = self._hub.body_read(self._conn, self._seq, self._level)
        except ConnectionResetError as exc:
            self.done = True
            raise _BodyError(0, str(exc)) from None
        except Exception as exc:            # hub.BodyRefused
            status = getattr(exc, "status", None)
            if status is None:
                raise
            self.done = True
            raise _BodyError(status, str(exc)) from None
        self._buf += data
        if last:
            self.done = True
        return True

    def read(self, size=-1):
        buf = self._buf
        if size is None or size < 0:
            while self._more():
                pass
            out = bytes(buf)
            buf.clear()
            return out
        while len(buf) < size and self._more():
            pass
        out = bytes(buf[:size])
        del buf[:size]
        return out

    def readline(self, size=-1):
        buf = self._buf
        while True:
            nl = buf.find(b"\n")
            if nl >= 0 or (size is not None and 0 <= size <= len(buf)) or not self._more():
                break
        end = nl + 1 if nl >= 0 else len(buf)
        if size is not None and size >= 0:
            end = min(end, size)
        out = bytes(buf[:end])
        del buf[:end]
        return out

    def readlines(self, hint=-1):
        lines, n = [], 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            n += len(line)
            if hint is not None and 0 < hint <= n:
                return lines

    def __iter__(self):
        return iter(self.readline, b"")

    def finish(self):
        """The request is over: the stack's pieces not taken go back."""
        if not self.done:
            self.done = True
            self._hub.body_done(self._conn, self._seq)


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


class _Sender:
    """A streamed body's sends, with backpressure as gunicorn has it (a
    blocking write): once more than SEND_HIGH_WATER bytes are queued and
    unsent, the worker greenlet waits until the stack has written them all
    (QS_EV_WRITABLE), so a slow reader holds at most that much here, plus
    what the kernel buffers.  The wait asks again every second; the stack
    resets a client that reads nothing for server.write_timeout, and then
    the wait raises ConnectionResetError: the app's iterator is closed.

    Not covered: bytes parked behind the reply to an earlier pipelined
    request still running count as written (the stack's WRITABLE looks at
    its out queue only), so they are bounded by that other request, not here."""

    __slots__ = ("conn", "hub", "id", "level", "unsent")

    def __init__(self, req):
        self.conn = req.conn
        self.hub = req._hub
        self.id = req.conn_id
        self.level = req.priority
        self.unsent = 0

    def send(self, data):
        self.conn.send(data)
        self.unsent += len(data)
        if self.unsent > SEND_HIGH_WATER:
            while not self.hub.wait_writable(self.id, self.level):
                pass
            self.unsent = 0


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
        if type(status) is not str:
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
                 multiprocess=False, access=False, access_sample=1.0,
                 server_header="qstack") -> None:
        self.app = app
        self.access = access
        self._sample = access_sample
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
        self._server = f"Server: {server_header}\r\n"
        self._heads: dict[tuple, tuple[bytes, bool]] = {}
        self._heads_until = 0.0
        self._date_t = 0
        self._date = ""
        self._peers: dict[int, tuple[str, int] | None] = {}

    # -- one request --------------------------------------------------------

    def _peer(self, req):
        """(REMOTE_ADDR, REMOTE_PORT) of the request's connection, kept per conn."""
        peers = self._peers
        if len(peers) > 65536:
            peers.clear()           # conn ids are never reused: old ones only cost memory
        p = req.conn.peer
        p = peers[req.conn_id] = (p[0], str(p[1])) if p else ("", "")
        return p

    def __call__(self, req):
        data = req.data
        if len(data) == 1:
            return self._refused(req, data[0])
        raw = data.tobytes()
        head_end = raw.find(b"\r\n\r\n")
        lines = raw[:head_end].decode("latin-1").split("\r\n")
        it = iter(lines)
        line = next(it)
        while not line:                         # empty lines before the request line
            line = next(it)
        method, target, protocol = line.split(" ")
        env = self._template.copy()
        keys = self._keys
        for line in it:
            name, _, value = line.partition(":")
            key = keys.get(name)
            if key is None:
                if len(keys) > 4096:
                    keys.clear()        # a client inventing names costs no memory
                key = keys[name] = _key(name)
                if not key:
                    continue
            elif not key:
                continue
            if key in env:
                env[key] = env[key] + "," + value.strip()
            else:
                env[key] = value.strip()
        path, _, query = target.partition("?")
        if "%" in path:
            path = unquote_to_bytes(path).decode("latin-1")
        if path[:1] != "/" and "://" in path:  # absolute-form
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        env["REQUEST_METHOD"] = method
        env["PATH_INFO"] = path
        env["QUERY_STRING"] = query
        env["SERVER_PROTOCOL"] = protocol
        env["RAW_URI"] = target
        env["qstack.priority"] = req.priority
        peer = self._peers.get(req.conn_id) or self._peer(req)
        if peer:
            env["REMOTE_ADDR"], env["REMOTE_PORT"] = peer
        body_start = head_end + 4
        body_in = None
        if body_start == len(raw) and ("HTTP_TRANSFER_ENCODING" in env or
                                       env.get("CONTENT_LENGTH", "0") not in ("", "0")):
            # the head alone: the body streams (a large one, http.c)
            body_in = env["wsgi.input"] = _BodyInput(req)
            env["wsgi.input_terminated"] = True
        elif "HTTP_TRANSFER_ENCODING" in env:
            body = _dechunk(raw, body_start)
            env["CONTENT_LENGTH"] = str(len(body))
            env["wsgi.input"] = io.BytesIO(body)
        elif body_start < len(raw):
            env["wsgi.input"] = io.BytesIO(raw[body_start:])
        else:
            env["wsgi.input"] = _NO_BODY
        conn_hdr = env.get("HTTP_CONNECTION")
        if protocol == "HTTP/1.1":
            keep = conn_hdr is None or "close" not in conn_hdr.lower()
        else:
            keep = conn_hdr is not None and "keep-alive" in conn_hdr.lower()
        if body_in is None:
            return self._respond(req, env, method, protocol, keep)
        try:
            return self._respond(req, env, method, protocol, keep, body_in)
        finally:
            body_in.finish()

    def _respond(self, req, env, method, protocol, keep, body_in=None):
        sr = _StartResponse()
        t0 = 0.0
        if self.access:
            t0 = time.time() if self._sample >= 1.0 or random() < self._sample else -1.0
        try:
            result = self.app(env, sr)
        except _BodyError as exc:
            return self._body_failed(req, exc)
        except Exception as exc:
            self._failed(req, exc)
            req.conn.close()
            return _500
        if body_in is not None and not body_in.done:
            keep = False        # the rest of the body is not read: close after the reply
        if type(result) is list and sr.writes is None and sr.status is not None:
            # The common shape (a list of bytes): one reply with its length.
            try:
                body = result[0] if len(result) == 1 else b"".join(result)
                if type(body) is not bytes:
                    body = bytes(body)
                # The same head for the same status, headers, length and
                # connection state: built once per second (its Date).
                if _time() >= self._heads_until:
                    self._heads.clear()
                    self._heads_until = int(_time()) + 1
                hk = (sr.status, tuple(sr.headers), protocol, keep, len(body), method)
                hit = self._heads.get(hk)
                if hit is None:
                    hit = self._heads[hk] = self._head(sr.status, sr.headers, protocol, keep,
                                                       len(body), method == "HEAD")[:2]
                    if len(self._heads) > 512:
                        self._heads_until = 0
                head, keep = hit
            except Exception as exc:
                self._failed(req, exc)
                req.conn.close()
                return _500
            if not keep:
                req.conn.close()
            if method == "HEAD":
                body = b""
            if t0 > 0.0:
                self._access(req, env, sr.status, len(body), t0)
            return head + body
        return self._respond_iter(req, env, method, protocol, keep, sr, result, t0, body_in)

    def _respond_iter(self, req, env, method, protocol, keep, sr, result, t0, body_in):
        """Any other iterable: buffered up to STREAM_AFTER, then streamed."""
        chunks = sr.writes or []
        size = sum(map(len, chunks))
        close = getattr(result, "close", None)
        streamed = False
        sent = 0
        head_only = method == "HEAD"
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
            if body_in is not None and not body_in.done:
                keep = False
            if not streamed:
                head, keep, _ = self._head(sr.status, sr.headers, protocol, keep, size,
                                           head_only)
                sent = 0 if head_only else size
                out = head if head_only else head + b"".join(chunks)
                if not keep:
                    req.conn.close()
                if t0 > 0.0:
                    self._access(req, env, sr.status, sent, t0)
                return out
            # streaming: the head, what we have, then the rest as it comes
            head, keep, chunked = self._head(sr.status, sr.headers, protocol, keep, None,
                                             head_only)
            sr.sent = True
            if head_only:
                req.conn.send(head)
                for _ in it:
                    pass
            else:
                send = _Sender(req).send
                body = b"".join(chunks)
                send(head + (b"%x\r\n%s\r\n" % (len(body), body) if chunked else body))
                sent = len(body)
                for chunk in it:
                    if chunk:
                        send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                        sent += len(chunk)
            if body_in is not None and not body_in.done:
                keep = False
            if not keep:
                req.conn.close()
            if t0 > 0.0:
                self._access(req, env, sr.status, sent, t0)
            return b"0\r\n\r\n" if chunked and not head_only else None
        except _BodyError as exc:
            if sr.sent:
                req.conn.close()
                return None
            return self._body_failed(req, exc)
        except ConnectionResetError:
            # the client went away while we waited to write (or the stack
            # reset it after server.write_timeout): not the app's error
            req.conn.close()
            return None
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

    def _head(self, status, headers, protocol, keep, size, head_only):
        """(the response head, keep-alive, chunked); size None: not known."""
        line = self._status.get(status)
        if line is None:
            line = self._status[status] = f"HTTP/1.1 {status}\r\n"
        parts = [line]
        have_len = have_date = have_server = False
        for name, value in headers:
            kind = _kind(name)
            if kind == _OTHER:
                parts.append(f"{name}: {value}\r\n")
                continue
            if kind == _LENGTH:
                have_len = True
            elif kind == _DATE:
                have_date = True
            elif kind == _SERVER:
                have_server = True
            else:                   # hop-by-hop: ours to set (PEP 3333)
                if kind == _CONNECTION and "close" in value.lower():
                    keep = False
                continue
            parts.append(f"{name}: {value}\r\n")
        if not have_date:
            now = int(time.time())
            if now != self._date_t:
                self._date_t = now
                self._date = f"Date: {formatdate(now, usegmt=True)}\r\n"
            parts.append(self._date)
        if not have_server:
            parts.append(self._server)
        chunked = False
        if not have_len:
            code = status[:3]
            if code in ("204", "304") or code[0] == "1":
                pass                # no body, no length
            elif size is not None:
                parts.append(f"Content-Length: {size}\r\n")
            elif protocol == "HTTP/1.1":
                chunked = not head_only
                if chunked:
                    parts.append("Transfer-Encoding: chunked\r\n")
            else:
                keep = False        # HTTP/1.0, length unknown: the close ends the body
        if not keep:
            parts.append("Connection: close\r\n")
        elif protocol != "HTTP/1.1":
            parts.append("Connection: keep-alive\r\n")
        parts.append("\r\n")
        return "".join(parts).encode("latin-1"), keep, chunked

    def _body_failed(self, req, exc):
        """The app let a _BodyError through: the stack's refusal is answered
        with its status (it counted and logged it); a client that left gets
        nothing.  The connection closes either way."""
        req.conn.close()
        return _ERROR_REPLY.get(exc.status) if exc.status else None

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
