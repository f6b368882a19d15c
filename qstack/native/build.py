"""cffi builder for qstack._native, the core (stack thread, rings, pool).

    python qstack/native/build.py                      # compile in place
    QSTACK_SANITIZE=1 python qstack/native/build.py    # ASan + UBSan build

then run the tests against the sanitized module (the runtime must be loaded
first, and the test file must not rebuild it):

    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \\
    QSTACK_NO_BUILD=1 .venv/bin/python -m pytest tests/test_native.py

(LeakSanitizer reports a few interpreter allocations at exit; none from qstack.)
setup.py lists ``qstack/native/build.py:ffibuilder`` in cffi_modules; see
cffibuild.py for what all builders share.

The uring backend needs liburing (Debian: liburing-dev, which `make test`
installs).  Without it the backend is not built: backend_uring_absent.c
takes its place, qs_uring_probe says -ENOPKG, and --backend auto serves on
the kernel backend.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cffibuild import COMMON, HERE, builder, compile_in_place, sources  # noqa: E402

# The user-space TCP/IP stack is part of the core (backend "ustack"), with
# the host code it shares with the load generator (common/ustack_host.c);
# its test harness (harness/) and the DPDK driver module (dpdk.c, built on
# its own where DPDK exists) are not.
USTACK = sources("ustack") + [os.path.join(COMMON, "ustack_host.c")]


def have_liburing():
    """liburing's header and library, where the compiler looks by default."""
    import ctypes.util
    return (any(os.path.exists(os.path.join(d, "liburing.h"))
                for d in ("/usr/include", "/usr/local/include"))
            and ctypes.util.find_library("uring") is not None)


# HTTP framing (QS_FRAME_HTTP) parses with llhttp.  Debian ships its C
# sources, not a library: node-llhttp puts them in /usr/share/llhttp (the
# header in /usr/share/include/llhttp), and they are compiled in here.
# Without them http_absent.c takes http.c's place and `serve --wsgi` says so.
LLHTTP_SRC = os.environ.get("QSTACK_LLHTTP_SRC", "/usr/share/llhttp")
LLHTTP_INC = os.environ.get("QSTACK_LLHTTP_INCLUDE", "/usr/share/include/llhttp")


def llhttp_sources():
    """llhttp's C files, or None if they are not installed."""
    files = [os.path.join(LLHTTP_SRC, n) for n in ("llhttp.c", "api.c", "http.c")]
    if all(os.path.exists(f) for f in files) and \
            os.path.exists(os.path.join(LLHTTP_INC, "llhttp.h")):
        return files
    return None


LLHTTP = llhttp_sources()
if not LLHTTP:
    print(f"llhttp not found in {LLHTTP_SRC} (Debian: apt-get install node-llhttp): "
          "HTTP framing (qstack serve --wsgi) is not built", file=sys.stderr)

URING = have_liburing()
if not URING:
    print("liburing not found (Debian: apt-get install liburing-dev): "
          "the uring backend is not built", file=sys.stderr)

ffibuilder = builder("_native", ("qsprio.h", "ustack_settings.h", "qstack.h"), "src", direct=__name__ == "__main__",
                     libraries=["pthread", "dl"] + (["uring"] if URING else []),
                     extra_sources=USTACK + (LLHTTP or []),
                     extra_include=[os.path.join(HERE, "ustack")] + ([LLHTTP_INC] if LLHTTP else []),
                     without=(("backend_uring_absent.c",) if URING else ("backend_uring.c",)) +
                     (("http_absent.c",) if LLHTTP else ("http.c",)))

if __name__ == "__main__":
    compile_in_place(ffibuilder, "_native")
