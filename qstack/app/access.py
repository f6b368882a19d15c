"""The access log of message handlers (``log.access``, off by default).

One line per request, or per sampled request with ``log.access_sample``
below 1, on the ``qstack.access`` logger, so it goes where the rest of the
log goes (stderr or ``log.file``, text or JSON)::

    access 127.0.0.1:40312 conn=0x1000002a priority=0 in=200 out=146 reply 0.412ms

The peer is ``host:port`` as accepted (``-`` if the connection is already
gone), ``in`` is the message's length, ``out`` the reply's (0 for none),
``result`` one of ``reply``, ``echo`` (the request's own buffer sent back),
``none`` or ``error`` (the handler raised), and the time is the handler's
own, from call to return.  With ``log.format: json`` the fields are keys
of the JSON object.

The log is a wrapper around the handler, made at start-up only when it is
on: with it off, serving costs exactly what it did.  Sampling draws once
per request (``random() < sample``), so the lines are an unbiased share.
"""

from __future__ import annotations

import logging
from random import random
from time import perf_counter
from typing import Any, Callable

from ..coro.errlog import peer_name

__all__ = ["access_logged"]

log = logging.getLogger("qstack.access")


def access_logged(handler: Callable[[Any], Any], sample: float = 1.0) -> Callable[[Any], Any]:
    """``handler`` wrapped so that its requests are logged (a share ``sample``)."""
    info = log.info

    def logged(req):
        if sample < 1.0 and random() >= sample:
            return handler(req)
        data = req.data
        t0 = perf_counter()
        try:
            out = handler(req)
        except Exception:
            _line(info, req, len(data), 0, "error", perf_counter() - t0)
            raise
        took = perf_counter() - t0
        if out is None:
            _line(info, req, len(data), 0, "none", took)
        else:
            _line(info, req, len(data), len(out), "echo" if out is data else "reply", took)
        return out

    logged.__wrapped__ = handler            # type: ignore[attr-defined]
    logged.__qualname__ = getattr(handler, "__qualname__", "handler")
    return logged


def _line(info, req, n_in: int, n_out: int, result: str, took: float) -> None:
    peer = peer_name(req.conn.peer) or "-"
    fields = {"peer": peer, "conn": f"{req.conn_id:#x}", "priority": req.priority,
              "bytes_in": n_in, "bytes_out": n_out, "result": result,
              "ms": round(took * 1e3, 3)}
    info("access %s conn=%s priority=%d in=%d out=%d %s %.3fms", peer, fields["conn"],
         req.priority, n_in, n_out, result, took * 1e3, extra={"access": fields})
