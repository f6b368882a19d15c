"""Handlers for tests/test_loadgen.py: known delays and server-side counts.

Serve with ``--framing fixed:64 --priority offset=5,value=0x01`` (echo) so
that each message of `qstack load` is one request with its priority.  A
64-byte message starting with b"STATS" is answered with the counts so far
(``"<high> <low> <requests> <heartbeats> <peer addresses>\\n"``, padded to 64
bytes; peer addresses: the distinct ones `counting` saw).
"""

import gevent

DELAY = 0.020          # sleepy: seconds every request takes
IOTEP_REPLY = 32       # iotep: bytes in a reply to a request

_counts = {"high": 0, "low": 0, "requests": 0, "heartbeats": 0}
_peers = set()         # counting: the distinct peer addresses seen


def _stats_reply():
    c = _counts
    return b"%d %d %d %d %d\n" % (c["high"], c["low"], c["requests"], c["heartbeats"],
                                   len(_peers))


def _count(req):
    _counts["high" if req.priority == 0 else "low"] += 1


def counting(req):
    """Echo, counting messages per priority level."""
    if bytes(req.data[:5]) == b"STATS":
        return _stats_reply().ljust(len(req.data), b" ")
    _count(req)
    peer = req.conn.peer
    if peer:
        _peers.add(peer[0])
    return req.data


def sleepy(req):
    """Echo after DELAY seconds (cooperatively)."""
    gevent.sleep(DELAY)
    return req.data


def iotep(req):
    """MCC's iotep: byte 5 == 1 is a request (IOTEP_REPLY bytes back), else a
    heartbeat (no reply)."""
    data = req.data
    if bytes(data[:5]) == b"STATS":
        return _stats_reply().ljust(len(data), b" ")
    _count(req)
    if data[5] == 1:
        _counts["requests"] += 1
        return bytes(data[:4]) + b"R" * (IOTEP_REPLY - 4)
    _counts["heartbeats"] += 1
    return None
