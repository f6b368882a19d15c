"""A handler that keeps slices of req.data past the request (test_hostile.py).

"k..." keeps data[1:]; "d" replies with every kept slice joined (then
forgets them); anything else is echoed, so the pool buffers get reused.
"""

kept = []


def handle(req):
    data = req.data
    if data[:1] == b"k":
        kept.append(data[1:])        # a view, kept past the request
        return b"ok\n"
    if data[:1] == b"d":
        out = b"".join(bytes(k) for k in kept)
        kept.clear()
        return out + b"\n"
    return data
