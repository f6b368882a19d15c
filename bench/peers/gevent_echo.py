"""Echo peer: gevent StreamServer, one greenlet per connection.

    python bench/peers/gevent_echo.py --port P [--host 127.0.0.1]

Reads up to 64 KiB and sends it straight back; prints nothing per request.
"""
import argparse
import signal
import socket

import gevent
from gevent.server import StreamServer


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


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backlog", type=int, default=4096)
    args = ap.parse_args()
    server = StreamServer((args.host, args.port), handle, backlog=args.backlog)
    gevent.signal_handler(signal.SIGTERM, server.stop, timeout=1)
    server.serve_forever()


if __name__ == "__main__":
    main()
