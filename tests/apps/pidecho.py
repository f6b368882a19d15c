"""Test handler: replies with the pid of the core that served the message.

``sleep`` makes the request last 30 s (cooperatively), so a test can stop the
server while a request is in flight.
"""

import os


def handle(req):
    data = bytes(req.data) if hasattr(req, "data") else b""
    if data.startswith(b"sleep"):
        import gevent
        gevent.sleep(30)
    return b"%d\n" % os.getpid()
