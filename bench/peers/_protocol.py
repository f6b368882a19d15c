"""The asyncio Protocol echo shared by the asyncio and uvloop peers."""
import asyncio
import signal


class Echo(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport):
        # asyncio and uvloop both set TCP_NODELAY on TCP transports already.
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        self.transport = None


async def serve(host, port, backlog):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, host, port, backlog=backlog)
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
    return ap.parse_args()
