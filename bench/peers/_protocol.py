"""The asyncio Protocol echo shared by the asyncio and uvloop peers."""
import asyncio
import signal

from _framing import framer


class Echo(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport):
        # asyncio and uvloop both set TCP_NODELAY on TCP transports already.
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        self.transport = None


class FramedEcho(asyncio.Protocol):
    """Whole messages echoed, a partial one kept; reading pauses while the
    transport holds more than its high-water mark (asyncio's flow control,
    as a careful Protocol does: a peer that never reads costs one buffer)."""

    split = None
    __slots__ = ("transport", "buf")

    def connection_made(self, transport):
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data):
        buf = self.buf
        buf += data
        n = self.split(buf)
        if n:
            self.transport.write(bytes(buf[:n]))
            del buf[:n]

    def pause_writing(self):
        self.transport.pause_reading()

    def resume_writing(self):
        self.transport.resume_reading()

    def connection_lost(self, exc):
        self.transport = None


async def serve(host, port, backlog, framing="raw"):
    loop = asyncio.get_running_loop()
    split = framer(framing)
    if split:
        proto = type("Framed", (FramedEcho,), {"split": staticmethod(split)})
    else:
        proto = Echo
    server = await loop.create_server(proto, host, port, backlog=backlog)
    stopped = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set_result, None)
    async with server:
        await stopped


def parse_args(doc):
    import argparse

    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backlog", type=int, default=4096)
    ap.add_argument("--framing", default="raw",
                    help="raw | line | fixed:N | length:N (whole messages echoed)")
    return ap.parse_args()
