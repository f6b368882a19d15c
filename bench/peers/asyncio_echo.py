"""Echo peer: asyncio Protocol on the default (selector) event loop.

    python bench/peers/asyncio_echo.py --port P [--host 127.0.0.1] [--framing F]
"""
import asyncio

from _protocol import parse_args, serve


def main():
    args = parse_args(__doc__)
    asyncio.run(serve(args.host, args.port, args.backlog, args.framing))


if __name__ == "__main__":
    main()
