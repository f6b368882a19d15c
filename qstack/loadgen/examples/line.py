"""A line protocol for ``qstack load --script``: each request is one line
that carries its sequence number and priority; the server's reply is a line
that carries them back (an echo server does exactly that).

    qstack serve apps.echo:handle --framing line --port 7000
    qstack load --dest 127.0.0.1:7000 --script qstack/loadgen/examples/line.py -c 10 -d 5

request() makes b"<seq> <H|L> <conn>\\n"; response() takes every whole line
in the buffered bytes and answers the seq written in it, so replies may come
in any order (a server that serves high priority first).  A protocol whose
replies carry no number would answer 0 for each reply (the oldest request).
"""

PAD = b"x" * 32   # a body, so the message is not only header


def request(conn, seq, high):
    return b"%d %s %d %s\n" % (seq, b"H" if high else b"L", conn, PAD)


def response(conn, data):
    end = data.rfind(b"\n") + 1          # whole lines only; 0 = wait for more
    if not end:
        return 0, []
    return end, [int(line.split(b" ", 1)[0]) for line in data[:end].splitlines()]
