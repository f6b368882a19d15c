"""iotepserver without Redis: what the load shape costs by itself.

    qstack serve apps.iotep_null:handle --config conf/iotepserver.yaml

Answers a request (byte 5 == 0x01) at once with iotepserver's 146-byte
reply and a heartbeat with nothing, touching no Redis.  ``bench/iotep.py
--null`` serves it under the same load as iotepserver: the request latency
it measures is the floor set by the load generator and the kernel on this
machine (sending a burst of thousands of messages takes its time too, and
latency counts from each message's intended send time), below which no
server can go.
"""

from apps.iotepserver import reply_bytes

__all__ = ["handle"]

_REPLY = reply_bytes()


def handle(req):
    data = req.data
    return _REPLY if len(data) > 5 and data[5] == 1 else None
