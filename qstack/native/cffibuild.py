"""What every cffi builder of qstack shares (out-of-line API mode).

Each native module has one cffi-parsable header in include/ that is both its
cdef and the first thing its C files include, so the C compiler checks the
implementation against exactly the declarations Python uses.  Types two
modules share are defined once, in a header of their own that both cdefs
read first (qsprio.h: levels and rules; ustack_api.h: the user-space
stack's settings and counters).  cffi cannot #include, so the builder
feeds a module's headers in order; C sees them with #pragma once.

A builder is used two ways: setuptools imports it from the repository root
(``cffi_modules`` in setup.py: sources must then be relative paths), and
``python qstack/native/build*.py`` compiles in place from anywhere (under
build/<name>/, with absolute paths; only the module is copied next to
qstack/__init__.py).  Only gcc and the Python headers are needed.

QSTACK_SANITIZE=1 builds with AddressSanitizer and UBSan.
"""

import glob
import os
import shutil

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
INCLUDE = os.path.join(HERE, "include")
COMMON = os.path.join(HERE, "common")

CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-comment",
          "-Werror=implicit-function-declaration", "-D_GNU_SOURCE"]
LDFLAGS = []
if os.environ.get("QSTACK_SANITIZE"):
    CFLAGS += ["-O1", "-g", "-fno-omit-frame-pointer",
               "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    LDFLAGS += ["-fsanitize=address,undefined"]


def _path(path, direct):
    """Absolute for a direct run; relative to the root for setuptools."""
    if direct:
        return path
    rel = os.path.relpath(path, os.getcwd())
    return path if rel.startswith("..") else rel


# Sources built into plain shared objects of their own, never into a cffi
# module: ustack/dpdk.c needs libdpdk (build_dpdk.py -> qstack/_qsdpdk.so).
NOT_CFFI = ("dpdk.c",)


def sources(src_dir, exclude=()):
    """<src_dir>/*.c, less the files whose names start with a prefix in exclude
    (and always less NOT_CFFI)."""
    skip = tuple(exclude) + NOT_CFFI
    return [p for p in sorted(glob.glob(os.path.join(HERE, src_dir, "*.c")))
            if not os.path.basename(p).startswith(skip)]


def have_liburing():
    """liburing's header and library, where the compiler looks by default."""
    import ctypes.util
    return (any(os.path.exists(os.path.join(d, "liburing.h"))
                for d in ("/usr/include", "/usr/local/include"))
            and ctypes.util.find_library("uring") is not None)


def transport_sources(uring):
    """The transport table (common/transport.h) with its three entries, and
    what the ustack entry runs: qstack's own TCP/IP stack (ustack/) and the
    host code around it.  Both the core and the load generator link these:
    one table under both.  Without liburing, transport_uring_absent.c takes
    transport_uring.c's place (the entry exists and refuses to open)."""
    common = [os.path.join(COMMON, n) for n in
              ("transport_sock.c", "transport_kernel.c", "transport_ustack.c",
               "transport_uring.c" if uring else "transport_uring_absent.c",
               "ustack_host.c")]
    return sources("ustack") + common


def _cdef_text(header):
    """A header as cffi reads it: C's include guard (#pragma once) dropped."""
    with open(os.path.join(INCLUDE, header)) as f:
        return "".join(line for line in f if line.strip() != "#pragma once")


def builder(module, headers, src_dir, *, direct, libraries=(), extra_sources=(),
            extra_include=(), without=()):
    """An FFI for qstack.<module> from include/<headers> (a name, or names in
    the order they build on each other: shared types first, the module's own
    header last) and <src_dir>/*.c less the file names in ``without``.
    common/ (C shared by several modules, not part of any ABI) is on every
    module's include path."""
    if isinstance(headers, str):
        headers = (headers,)
    src = os.path.join(HERE, src_dir)
    ffi = FFI()
    for header in headers:
        ffi.cdef(_cdef_text(header))
    srcs = [p for p in sources(src_dir) if os.path.basename(p) not in without]
    srcs += list(extra_sources)
    includes = "".join(f'#include "{h}"\n' for h in headers)
    ffi.set_source(
        f"qstack.{module}",
        f'#include <stdint.h>\n{includes}',
        sources=[_path(p, direct) for p in srcs],
        include_dirs=[_path(p, direct) for p in (INCLUDE, src, COMMON, *extra_include)],
        extra_compile_args=CFLAGS,
        extra_link_args=LDFLAGS,
        libraries=list(libraries),
    )
    return ffi


def compile_in_place(ffi, module):
    """Build under build/<module>/ and copy the module into qstack/."""
    built = ffi.compile(tmpdir=os.path.join(ROOT, "build", module), verbose=False)
    target = os.path.join(ROOT, "qstack", os.path.basename(built))
    # Copy then rename: a process running the old module keeps its inode
    # (overwriting a mapped .so in place crashes it).
    shutil.copy2(built, target + ".tmp")
    os.replace(target + ".tmp", target)
