"""Sans-IO framing for the peers, the same kinds as qstack's --framing:
raw, line, fixed:N, length:N (N-byte big-endian length, then the payload).

``framer(spec)(buf)`` -> ``(n, complete)``: the first ``n`` bytes of ``buf``
are whole messages (echoed as they are, header included), the rest is a
partial message kept for the next read.  No cap on a message's size: these
are the plain servers a user would write, not hardened ones."""


def framer(spec):
    kind, _, arg = (spec or "raw").partition(":")
    if kind == "raw":
        return None
    if kind == "line":
        return lambda buf: buf.rfind(b"\n") + 1
    if kind == "fixed":
        size = int(arg)
        return lambda buf: len(buf) - len(buf) % size
    if kind == "length":
        h = int(arg)

        def length(buf):
            n, end = 0, len(buf)
            while end - n >= h:
                total = h + int.from_bytes(buf[n:n + h], "big")
                if end - n < total:
                    break
                n += total
            return n
        return length
    raise ValueError(f"unknown framing {spec!r}")
