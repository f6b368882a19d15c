"""Echo peer: the same asyncio Protocol on uvloop.

    python bench/peers/uvloop_echo.py --port P [--host 127.0.0.1] [--framing F]
"""
import uvloop

from _protocol import parse_args, serve


def main():
    args = parse_args(__doc__)
    uvloop.run(serve(args.host, args.port, args.backlog, args.framing))


if __name__ == "__main__":
    main()
