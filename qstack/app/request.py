"""The handler API: what a handler receives.

A message handler is ``def handle(req) -> bytes | None``.  It runs on one of
the core's worker greenlets; ``req`` is reused by that worker for its next
request, so it is valid only until the handler returns.  ``req.data`` is a
memoryview straight over the pool buffer the stack thread read into (zero
copy); it is released when the handler returns.  Keep the bytes with
``bytes(req.data)``.  Returning ``req.data`` itself sends that buffer back
without a copy; returning any other bytes-like object copies it once into the
native send path; returning None sends nothing.

A stream handler is ``def handle(conn)``, marked with :func:`stream`.  It gets
a greenlet of its own for the life of the connection, in the style of gevent's
StreamServer, and uses ``conn.recv``, ``conn.send``/``sendall`` and
``conn.close``.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar, Union

__all__ = ["Request", "Connection", "stream", "Buffer", "Reply"]

# What a handler may send or return: any bytes-like object.
Buffer = Union[bytes, bytearray, memoryview]
# What a message handler returns: a reply, or None for no reply.
Reply = Union[Buffer, None]
_H = TypeVar("_H", bound=Callable[..., Any])


class Request:
    """One framed message.  Attributes: data, priority (0 is highest), conn."""

    __slots__ = ("data", "priority", "conn_id", "seq", "_hub")

    data: memoryview
    priority: int
    conn_id: int
    seq: int

    def __init__(self, hub: Any) -> None:
        self._hub = hub
        self.data = None  # type: ignore[assignment]  (set before the handler runs)
        self.priority = 0
        self.conn_id = 0
        self.seq = 0            # the message's place on its connection (hub's business)

    @property
    def conn(self) -> Connection:
        """The connection this request came on (to send more, or close it).

        With ``server.reply_order: arrival`` its sends go out in this
        request's place among the connection's replies (after the replies to
        earlier messages, before this request's own), and close() closes
        right after this request's reply."""
        return Connection(self._hub, self.conn_id,
                          (self.seq, self.priority) if self.seq else None)

    def __repr__(self) -> str:
        n = len(self.data) if self.data is not None else 0
        return f"<Request conn={self.conn_id} priority={self.priority} {n} bytes>"


class Connection:
    """A connection as a handler sees it.  Sends are queued to the stack thread.

    Stream handlers get the full socket-like API (recv/send/sendall/close);
    message handlers use ``req.conn.send(data)`` to push extra replies and
    ``req.conn.close()`` to close after the queued replies are written.
    """

    __slots__ = ("_hub", "id", "_slot")

    id: int

    def __init__(self, hub: Any, conn_id: int, slot: tuple[int, int] | None = None) -> None:
        self._hub = hub
        self.id = conn_id
        self._slot = slot       # (seq, level) of the request it came from, if ordered

    def send(self, data: Buffer, priority: int | None = None) -> int:
        """Queue all of ``data`` for sending; returns len(data)."""
        if self._slot is None:
            return self._hub.conn_send(self.id, data, priority)
        return self._hub.conn_send(self.id, data, priority, slot=self._slot)

    def sendall(self, data: Buffer, priority: int | None = None) -> None:
        """Queue ``data`` and wait while too much is unsent (flow control)."""
        if self._slot is None:
            self._hub.conn_send(self.id, data, priority, wait=True)
        else:
            self._hub.conn_send(self.id, data, priority, wait=True, slot=self._slot)

    @property
    def peer(self) -> tuple[str, int] | None:
        """``(host, port)`` of the client, as accepted (what a socket's
        ``getpeername()`` says); None once the connection is long gone."""
        return self._hub.conn_peer(self.id)

    def recv(self, bufsize: int = 65536) -> bytes:
        """Stream handlers: up to ``bufsize`` bytes; b"" once the peer closed."""
        return self._hub.conn_recv(self.id, bufsize)

    def close(self) -> None:
        """Close after everything queued so far has been written."""
        if self._slot is None:
            self._hub.conn_close(self.id)
        else:
            self._hub.conn_close(self.id, slot=self._slot)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Connection) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<Connection {self.id:#x}>"


def stream(handler: _H) -> _H:
    """Mark ``handler`` as a stream handler: ``handler(conn)`` per connection."""
    handler.__qstack_stream__ = True  # type: ignore[attr-defined]
    return handler
