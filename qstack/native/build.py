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

The uring transport needs liburing (Debian: liburing-dev, which `make test`
installs).  Without it the transport is not built: transport_uring_absent.c
takes its place, qs_uring_probe says -ENOPKG, and --backend auto serves on
the kernel backend.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cffibuild import HERE, builder, compile_in_place, have_liburing, transport_sources  # noqa: E402


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

# The transport table and its entries (common/transport*.c), with the
# user-space TCP/IP stack the ustack entry runs; the stack's test harness
# (harness/) and the DPDK driver module (dpdk.c, built on its own where DPDK
# exists) are not part of the core.
TRANSPORT = transport_sources(URING)

ffibuilder = builder("_native", ("qsprio.h", "ustack_settings.h", "qstack.h"), "src", direct=__name__ == "__main__",
                     libraries=["pthread", "dl"] + (["uring"] if URING else []),
                     extra_sources=TRANSPORT + (LLHTTP or []),
                     extra_include=[os.path.join(HERE, "ustack")] + ([LLHTTP_INC] if LLHTTP else []),
                     without=("http_absent.c",) if LLHTTP else ("http.c",))

if __name__ == "__main__":
    compile_in_place(ffibuilder, "_native")
