"""Echo peer: gevent StreamServer, one greenlet per connection.

    python bench/peers/gevent_echo.py --port P [--host 127.0.0.1] [--framing F]

Reads up to 64 KiB and sends it straight back; prints nothing per request.
With --framing (line, fixed:N, length:N, as qstack's) it echoes whole
messages only, keeping a partial one until it completes (bench/hostile.py).
"""
import argparse
import signal
import socket

import gevent
from gevent.server import StreamServer

from _framing import framer


def handle(sock, _address):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    recv, sendall = sock.recv, sock.sendall
    try:
        while True:
            data = recv(65536)
            if not data:
                break
            sendall(data)
    except OSError:
        pass  # a reset client is not worth a traceback per connection
    finally:
        sock.close()


def framed(split):
    """handle() for messages: whole messages echoed, partials kept."""
    def handle_framed(sock, _address):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        recv, sendall, buf = sock.recv, sock.sendall, bytearray()
        try:
            while True:
                data = recv(65536)
                if not data:
                    break
                buf += data
                n = split(buf)
                if n:
                    sendall(buf[:n])
                    del buf[:n]
        except OSError:
            pass
        finally:
            sock.close()
    return handle_framed


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backlog", type=int, default=4096)
    ap.add_argument("--framing", default="raw")
    args = ap.parse_args()
    split = framer(args.framing)
    server = StreamServer((args.host, args.port), framed(split) if split else handle,
                          backlog=args.backlog)
    gevent.signal_handler(signal.SIGTERM, server.stop, timeout=1)
    server.serve_forever()


if __name__ == "__main__":
    main()
