"""A handler module that monkey-patches everything at import, as apps that
use blocking libraries do (logging's locks become gevent's)."""

from gevent import monkey

monkey.patch_all()

_real_sleep = monkey.get_original("time", "sleep")


def blocking_patched(req):
    """Blocks the core for 1 s on b"block" (the original time.sleep); echoes
    the rest."""
    if bytes(req.data).startswith(b"block"):
        _real_sleep(1.0)
        return b"unblocked\n"
    return req.data
